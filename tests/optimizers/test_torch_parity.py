"""SGD, Adam and AdamW match torch.optim step by step (ALGORITHMS.md §11.1-2)."""

from __future__ import annotations

import pytest
import torch

from gradchain import chain
from gradchain.optimizers import SGD, Adam, AdamW, ChainOptimizer
from gradchain.transforms import add_decayed_weights, scale_by_adam, scale_by_learning_rate, trace

STEPS = 100
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(dtype)


# Learning rates and decays are powers of two: torch's AdamW multiplies by the scalar
# 1 - lr * weight_decay, which it rounds to float32 (a systematic bias of up to 3e-8 per step that
# the additive decay of a chain does not have); with these values that scalar is exact, so the
# comparison measures the algorithms, not that rounding. See test_float32_adamw_error_*.
def _groups(model: torch.nn.Module, lr: float = 2.0**-6, weight_decay: float = 2.0**-3
            ) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": lr / 4, "weight_decay": 0.0}]


def _trajectory(make_optimizer, dtype: torch.dtype, **group_options) -> list[list[torch.Tensor]]:
    model = _model(dtype)
    optimizer = make_optimizer(_groups(model, **group_options))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)
    data = torch.Generator().manual_seed(1)
    points = []
    for _ in range(STEPS):
        x = torch.randn(32, 6, generator=data).to(dtype)
        y = torch.randn(32, 3, generator=data).to(dtype)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        points.append([p.detach().clone() for p in model.parameters()])
    return points


def _assert_same_trajectory(ours, reference, dtype) -> None:
    for step, (a, b) in enumerate(zip(ours, reference)):
        for x, y in zip(a, b):
            error = (x - y).norm() / y.norm()
            assert error <= TOLERANCE[dtype], f"step {step}: relative error {error:.3g}"


CASES = {
    "sgd": (lambda g: SGD(g), lambda g: torch.optim.SGD(g)),
    "sgd_momentum": (lambda g: SGD(g, momentum=0.9),
                     lambda g: torch.optim.SGD(g, momentum=0.9)),
    "sgd_nesterov": (lambda g: SGD(g, momentum=0.9, nesterov=True),
                     lambda g: torch.optim.SGD(g, momentum=0.9, nesterov=True)),
    "adam": (lambda g: Adam(g, betas=(0.8, 0.99)),
             lambda g: torch.optim.Adam(g, betas=(0.8, 0.99))),
    "adamw": (lambda g: AdamW(g, betas=(0.85, 0.995), eps=1e-6),
              lambda g: torch.optim.AdamW(g, betas=(0.85, 0.995), eps=1e-6)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_named_optimizer_matches_torch(case, dtype):
    ours, theirs = CASES[case]
    _assert_same_trajectory(_trajectory(ours, dtype), _trajectory(theirs, dtype), dtype)


def _adamw_by_hand(lr: float, weight_decay: float):
    return chain(scale_by_adam(0.9, 0.999, 1e-8), add_decayed_weights(weight_decay),
                 scale_by_learning_rate(lr))


def _sgd_by_hand(lr: float, weight_decay: float):
    return chain(add_decayed_weights(weight_decay), trace(0.9, nesterov=True),
                 scale_by_learning_rate(lr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("recipe, reference", [
    (_adamw_by_hand, lambda g: torch.optim.AdamW(g)),
    (_sgd_by_hand, lambda g: torch.optim.SGD(g, momentum=0.9, nesterov=True)),
], ids=["adamw", "sgd_nesterov"])
def test_chain_built_by_hand_matches_torch(recipe, reference, dtype):
    """ALGORITHMS.md §11.2: chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)
    is torch's AdamW, here through ChainOptimizer with a recipe of lr and weight_decay."""
    ours = _trajectory(lambda g: ChainOptimizer(g, recipe, lr=1.0, weight_decay=1.0), dtype)
    _assert_same_trajectory(ours, _trajectory(reference, dtype), dtype)


def test_parity_check_detects_a_different_optimizer():
    """The comparison above can fail: Adam is not AdamW once weight decay is on."""
    ours = _trajectory(lambda g: Adam(g), torch.float64)
    theirs = _trajectory(lambda g: torch.optim.AdamW(g), torch.float64)
    with pytest.raises(AssertionError):
        _assert_same_trajectory(ours, theirs, torch.float64)


def _largest_error(trajectory, truth) -> float:
    return max(float((x.double() - y).norm() / y.norm())
               for point, true_point in zip(trajectory, truth) for x, y in zip(point, true_point))


def test_float32_adamw_error_is_at_most_torchs_against_float64():
    """With a decay factor 1 - lr*wd that float32 cannot hold, our float32 AdamW stays at least
    as close to the float64 trajectory as torch's float32 AdamW does."""
    options = {"lr": 0.02, "weight_decay": 0.1}
    truth = _trajectory(lambda g: torch.optim.AdamW(g), torch.float64, **options)
    ours = _largest_error(_trajectory(lambda g: AdamW(g), torch.float32, **options), truth)
    theirs = _largest_error(_trajectory(lambda g: torch.optim.AdamW(g), torch.float32,
                                        **options), truth)
    assert ours <= theirs
    assert ours < 1e-6
