"""Stochastic rounding to bfloat16 (ALGORITHMS.md §9.1, §11 item 31): the bit trick, its
edge cases, unbiasedness, and bf16 training that tracks float32."""

from __future__ import annotations

import io
import math

import pytest
import torch

from gradchain.chains import sgd
from gradchain.core import apply_updates, stochastic_round_
from gradchain.optimizers import ChainOptimizer

BF16 = torch.bfloat16


def _round(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    out = torch.empty(values.shape, dtype=BF16)
    return stochastic_round_(out, values, torch.Generator().manual_seed(seed))


def test_one_plus_two_to_minus_ten_rounds_up_one_time_in_eight():
    n = 1 << 16
    out = _round(torch.full((n,), 1 + 2 ** -10)).float()
    assert set(out.unique().tolist()) == {1.0, 1.0078125}
    share_up = (out == 1.0078125).double().mean().item()
    sigma = math.sqrt(1 / 8 * 7 / 8 / n)
    assert abs(share_up - 1 / 8) < 5 * sigma


def test_negative_values_round_symmetrically():
    n = 1 << 16
    out = _round(torch.full((n,), -(1 + 2 ** -10)), seed=1).float()
    assert set(out.unique().tolist()) == {-1.0, -1.0078125}
    assert abs((out == -1.0078125).double().mean().item() - 1 / 8) < 5 * math.sqrt(7 / 64 / n)


def test_rounding_is_unbiased():
    """The mean of many roundings of each value is the value, within statistical tolerance
    (each rounding errs by at most one bf16 spacing)."""
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(64, generator=gen) * torch.logspace(-3, 3, 64)
    draws = 4096
    total = torch.zeros(64, dtype=torch.float64)
    for seed in range(draws):
        total += _round(values, seed=seed).double()
    mean = total / draws
    spacing = (values.abs().bfloat16().float() * 2 ** -7).double()
    assert ((mean - values.double()).abs() < 5 * spacing / (2 * math.sqrt(draws))).all()
    nearest_error = (values.bfloat16().double() - values.double()).abs()
    assert (mean - values.double()).abs().mean() < 0.2 * nearest_error.mean()


def test_representable_values_zeros_infinities_and_nans_pass_through():
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0 ** 100, float("inf"), -float("inf")])
    for seed in range(50):
        out = _round(special, seed=seed)
        assert torch.equal(out.float(), special)
        assert torch.signbit(out[1])
    payload_nan = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    for seed in range(50):
        assert _round(payload_nan, seed=seed).isnan().all()


def test_largest_finite_values_round_up_to_infinity_only_from_above_bfloat16_max():
    top = torch.finfo(BF16).max
    just_above = torch.full((4096,), top * (1 + 2 ** -10))  # between bf16 max and the next step
    out = _round(just_above).float()
    assert set(out.unique().tolist()) <= {top, math.inf}


def test_a_dedicated_generator_leaves_the_global_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _round(torch.full((10,), 1.001))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(_round(torch.full((100,), 1.001), seed=5),
                       _round(torch.full((100,), 1.001), seed=5))


def test_target_must_be_bfloat16():
    with pytest.raises(ValueError, match="bfloat16"):
        stochastic_round_(torch.zeros(2), torch.ones(2))


def test_apply_updates_rounds_bfloat16_params_once_and_adds_others_normally():
    p16, p32 = torch.ones(4096, dtype=BF16), torch.ones(4096)
    step = torch.full((4096,), 2 ** -10)
    apply_updates([p16, p32], [step, step], stochastic_rounding=True,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(p32, torch.full((4096,), 1 + 2 ** -10))
    assert set(p16.float().unique().tolist()) == {1.0, 1.0078125}
    nearest = torch.ones(4, dtype=BF16)
    apply_updates([nearest], [torch.full((4,), 2 ** -10)])
    assert torch.equal(nearest.float(), torch.ones(4))  # below half a spacing: lost


def _regression(dtype: torch.dtype, stochastic_rounding: bool, steps: int = 400):
    """Full-batch least squares with a learning rate whose steps are mostly below half a bf16
    spacing of the weights (|w| ~ 1, spacing 2^-7)."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 16, generator=gen)
    target_w = 1.0 + 0.5 * torch.randn(16, generator=gen)
    targets = inputs @ target_w
    w = torch.nn.Parameter(torch.ones(16, dtype=dtype))
    opt = ChainOptimizer([w], sgd, lr=2e-3, stochastic_rounding=stochastic_rounding)
    for _ in range(steps):
        loss = (inputs @ w.float() - targets).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().float()


def test_bfloat16_training_with_stochastic_rounding_tracks_float32():
    reference = _regression(torch.float32, False)
    stochastic = _regression(BF16, True)
    nearest = _regression(BF16, False)
    err_sr = (stochastic - reference).norm().item()
    err_rn = (nearest - reference).norm().item()
    assert err_sr < 0.25 * err_rn, (err_sr, err_rn)


def test_optimizer_saves_its_rounding_generator_and_resumes_identically():
    def run(checkpoint_at: int | None):
        w = torch.nn.Parameter(torch.ones(64, dtype=BF16))
        opt = ChainOptimizer([w], sgd, lr=1e-3, stochastic_rounding=True, rounding_seed=7)
        for step in range(6):
            if step == checkpoint_at:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                w2 = torch.nn.Parameter(w.detach().clone())
                opt = ChainOptimizer([w2], sgd, lr=1e-3, stochastic_rounding=True)
                opt.load_state_dict(torch.load(buffer, weights_only=True))
                w = w2
            w.grad = torch.linspace(-1, 1, 64, dtype=BF16)
            opt.step()
        return w.detach()

    assert torch.equal(run(None), run(3))
    assert not torch.equal(run(None), torch.ones(64, dtype=BF16))
