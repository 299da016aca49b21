"""ChainOptimizer behaves as a torch.optim.Optimizer: groups, schedulers, hooks, state_dict."""

from __future__ import annotations

import io

import pytest
import torch

import gradchain.optimizers.adapter as adapter
from gradchain import chains
from gradchain.optimizers import SGD, Adam, AdamW, ChainOptimizer
from gradchain.transforms import scale_by_adam, scale_by_learning_rate


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2)).to(dtype)


def _train(model, optimizer, steps: int, seed: int = 1, scheduler=None) -> list[float]:
    data = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 5, generator=data).to(next(model.parameters()).dtype)
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_state_dict_has_readable_keys_and_loads_with_weights_only():
    model = _model()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert set(loaded["state"][0]) == {"step", "adam.count", "adam.mu", "adam.nu"}
    assert loaded["state"][0]["step"] == 3 and loaded["state"][0]["adam.count"] == 3
    assert loaded["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert loaded["param_groups"][0]["lr"] == 1e-2


@pytest.mark.parametrize("make", [
    lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    lambda ps: Adam(ps, lr=1e-2),
], ids=["adamw", "sgd", "adam"])
def test_save_load_continue_is_bit_identical(make):
    model = _model()
    optimizer = make(model.parameters())
    _train(model, optimizer, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, 5, seed=2)
    uninterrupted = _params(model)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(checkpoint["model"])
    fresh = make(resumed.parameters())
    fresh.load_state_dict(checkpoint["optimizer"])
    _train(resumed, fresh, 5, seed=2)
    for a, b in zip(_params(resumed), uninterrupted):
        assert torch.equal(a, b)


def test_loading_into_a_different_group_layout_is_refused():
    model = _model()
    optimizer = AdamW(model.parameters())
    _train(model, optimizer, 1)
    params = list(model.parameters())
    other = AdamW([{"params": params[:2]}, {"params": params[2:]}])
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(optimizer.state_dict())


def test_groups_use_their_own_hyperparameters():
    model = _model()
    weights, biases = model[0].weight, model[0].bias
    optimizer = SGD([{"params": [weights], "lr": 0.5}, {"params": [biases]}], lr=0.1)
    before_w, before_b = weights.detach().clone(), biases.detach().clone()
    weights.grad, biases.grad = torch.ones_like(weights), torch.ones_like(biases)
    optimizer.step()
    torch.testing.assert_close(weights.detach(), before_w - 0.5, rtol=0, atol=1e-7)
    torch.testing.assert_close(biases.detach(), before_b - 0.1, rtol=0, atol=1e-7)


def test_lr_scheduler_changes_the_next_step_and_nothing_is_written_back():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    moves = []
    for _ in range(3):
        param.grad = torch.ones(1)
        before = param.item()
        optimizer.step()
        scheduler.step()
        moves.append(before - param.item())
    assert moves == [1.0, 0.5, 0.25]


def test_schedule_as_hyperparameter_is_evaluated_at_the_group_step_and_kept():
    param = torch.nn.Parameter(torch.zeros(1))
    schedule = lambda step: 1.0 / (step + 1)  # noqa: E731
    optimizer = SGD([param], lr=schedule)
    moves = []
    for _ in range(3):
        param.grad = torch.ones(1)
        before = param.item()
        optimizer.step()
        moves.append(before - param.item())
    assert moves == pytest.approx([1.0, 0.5, 1.0 / 3.0], rel=1e-6)
    assert optimizer.param_groups[0]["lr"] is schedule


def test_add_param_group_mid_training_and_validation():
    model = _model()
    params = list(model.parameters())
    optimizer = AdamW(params[:2], lr=1e-2)
    _train(model, optimizer, 2)
    with pytest.raises(ValueError, match="learning_rate"):
        optimizer.add_param_group({"params": params[2:], "lr": -1.0})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": params[2:], "lr": 1e-3})
    before = _params(model)
    _train(model, optimizer, 1)
    assert not torch.equal(before[3], params[3].detach())
    state = optimizer.state_dict()["state"]
    assert state[0]["step"] == 3 and state[2]["step"] == 1


def test_parameters_without_gradient_are_skipped():
    model = _model()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, 2)
    frozen = model[2].bias
    mu_before = optimizer.state[frozen]["adam.mu"].clone()
    value_before = frozen.detach().clone()
    optimizer.zero_grad()
    model(torch.randn(4, 5)).square().mean().backward()
    frozen.grad = None
    optimizer.step()
    assert torch.equal(frozen.detach(), value_before)
    assert torch.equal(optimizer.state[frozen]["adam.mu"], mu_before)
    assert not torch.equal(optimizer.state[model[0].weight]["adam.mu"], mu_before)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = _model()
    optimizer = AdamW(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    optimizer.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0


def test_closure_loss_is_returned_and_hooks_run():
    model = _model()
    optimizer = AdamW(model.parameters())
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))

    def closure():
        optimizer.zero_grad()
        loss = model(torch.ones(3, 5)).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]


def test_chunked_and_whole_group_steps_are_bitwise_equal(monkeypatch):
    results = []
    for chunk in (1, 1 << 30):
        monkeypatch.setattr(adapter, "CHUNK_ELEMENTS", chunk)
        model = _model()
        optimizer = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
        _train(model, optimizer, 4)
        results.append(_params(model) + [optimizer.state[p]["adam.nu"]
                                         for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_named_parameters_reach_masks():
    model = _model()
    optimizer = ChainOptimizer(model.named_parameters(), chains.adamw, lr=0.0,
                               weight_decay=1.0, mask=["*.weight"])
    # lr = 0: nothing moves; check through a recipe whose decay alone moves with lr > 0
    assert optimizer.param_groups[0]["param_names"][0] == "0.weight"
    optimizer = ChainOptimizer(model.named_parameters(), chains.adamw, lr=0.1, b1=0.0,
                               weight_decay=1.0, mask=["*.bias"])
    bias, weight = model[0].bias.detach().clone(), model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model[0].bias.detach(), bias * 0.9)
    torch.testing.assert_close(model[0].weight.detach(), weight)


def test_fixed_transform_drives_the_optimizer():
    param = torch.nn.Parameter(torch.ones(2))
    tx = chains.chain(scale_by_adam(), scale_by_learning_rate(0.1))
    optimizer = ChainOptimizer([param], tx)
    param.grad = torch.tensor([1.0, -1.0])
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([0.9, 1.1]))
    with pytest.raises(ValueError, match="recipe"):
        ChainOptimizer([param], tx, lr=0.1)


def test_the_state_view_follows_every_step_and_load_with_the_live_tensors():
    model = _model()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    weight = model[0].weight
    assert weight in optimizer.state and optimizer.state[weight] == {}  # as torch's, unstepped
    for steps in (1, 2):
        _train(model, optimizer, 1)
        entry = optimizer.state[weight]
        assert entry["step"] == steps and entry["adam.count"] == steps
        assert entry["adam.mu"] is optimizer.chain_state()["adam"].mu[0]
    twin = AdamW(model.parameters(), lr=1e-2)
    twin.load_state_dict(optimizer.state_dict())
    assert twin.state[weight]["step"] == 2
    assert torch.equal(twin.state[weight]["adam.nu"], optimizer.state[weight]["adam.nu"])


def test_bfloat16_parameters_keep_float32_state():
    model = _model(torch.bfloat16)
    optimizer = AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, 2)
    entry = optimizer.state[model[0].weight]
    assert entry["adam.mu"].dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16


def test_a_step_folds_the_learning_rate_and_decay_into_the_apply_as_the_chain_defines_it():
    """x <- x + b x + a u (unscaled) equals the chain's own update added to x, up to rounding;
    bfloat16 parameters take the update in float32, rounded once: bit for bit the chain's."""
    torch.manual_seed(0)
    for dtype, rtol in ((torch.float64, 1e-13), (torch.bfloat16, 0)):
        x = torch.randn(6, 5).to(dtype)
        param = torch.nn.Parameter(x.clone())
        param.grad = torch.randn(6, 5).to(dtype)
        AdamW([param], lr=0.1, weight_decay=0.5).step()
        tx = chains.adamw(learning_rate=0.1, weight_decay=0.5)
        wide = x.double() if dtype == torch.float64 else x.float()
        updates, _ = tx.update([param.grad.to(wide.dtype)], tx.init([wide]), [wide])
        expected = (wide + updates[0]).to(dtype)
        torch.testing.assert_close(param.detach(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(lr=-1.0), "learning_rate"),
    (dict(betas=(1.0, 0.999)), "b1"),
    (dict(betas=(0.9, -0.1)), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_invalid_hyperparameters_raise_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        AdamW(_model().parameters(), **bad)


def test_unknown_hyperparameter_is_named():
    with pytest.raises(ValueError, match="momentum"):
        ChainOptimizer(_model().parameters(), chains.adamw, momentum=0.9)


def test_mismatched_or_sparse_gradients_raise_before_anything_changes():
    model = _model()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, 1)
    before = _params(model)
    model(torch.randn(2, 5)).sum().backward()
    model[0].weight.grad.set_(torch.ones(3, 3))  # torch refuses `.grad = ` of another shape
    with pytest.raises(ValueError, match="shape"):
        optimizer.step()
    model[0].weight.grad = torch.ones_like(model[0].weight).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        optimizer.step()
    for a, b in zip(_params(model), before):
        assert torch.equal(a, b)


def test_a_bad_gradient_in_a_later_group_leaves_earlier_groups_untouched():
    model = _model()
    params = list(model.parameters())
    optimizer = SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    model(torch.randn(2, 5)).sum().backward()
    params[3].grad.set_(torch.ones(7))
    before = _params(model)
    with pytest.raises(ValueError, match="shape"):
        optimizer.step()
    for a, b in zip(_params(model), before):
        assert torch.equal(a, b)


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


@pytest.mark.slow
def test_compiled_step_matches_eager():
    trajectories = []
    for compile in (False, True):
        model = _model()
        optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, compile=compile)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        _train(model, optimizer, 6, scheduler=scheduler)
        trajectories.append(_params(model))
    for a, b in zip(*trajectories):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [None, ["2.*"]], ids=["all", "masked"])
def test_step_never_writes_into_param_grad(mask):
    """In-place transforms clone the raw gradient first, also for a masked subset."""
    from gradchain.transforms import add_decayed_weights, trace

    model = _model()
    tx = chains.chain(add_decayed_weights(0.5, mask=mask), trace(0.9),
                      scale_by_learning_rate(0.1))
    optimizer = ChainOptimizer(model.named_parameters(), tx)
    model(torch.randn(4, 5)).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    optimizer.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def _state_tensors(state) -> list[torch.Tensor]:
    from gradchain.core import flatten_state

    per_param, _ = flatten_state(state, 2)
    return [t for entry in per_param for t in entry.values() if isinstance(t, torch.Tensor)]


ELEMENTWISE = {
    "adamw": lambda: chains.adamw(0.1, weight_decay=0.1),
    "sgd": lambda: chains.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "masked_by_name": lambda: chains.masked(chains.adam(0.1), ["a"]),
    "multi_steps": lambda: chains.multi_steps(chains.adamw(0.1), 2),
}


@pytest.mark.parametrize("case", sorted(ELEMENTWISE))
def test_elementwise_transforms_update_their_state_in_place(case):
    """Row blocks rely on it: the per-parameter state tensors stay the same objects."""
    tx = ELEMENTWISE[case]()
    assert tx.elementwise
    params = {"a": torch.ones(3, 2), "b": torch.ones(4)}
    state = tx.init(params)
    before = _state_tensors(state)
    for _ in range(3):
        _, state = tx.update({k: torch.randn_like(v) for k, v in params.items()}, state, params)
    after = _state_tensors(state)
    assert before and len(before) == len(after)
    assert all(a is b for a, b in zip(before, after))


def test_a_shape_predicate_makes_a_chain_not_elementwise():
    """Row blocks change shapes, so masks given as predicates keep whole parameters."""
    assert not chains.masked(chains.adam(), lambda name, p: p.ndim >= 2).elementwise
    assert not chains.adamw(mask=lambda name, p: p.ndim >= 2).elementwise
    assert chains.adamw(mask=["*.weight"]).elementwise
