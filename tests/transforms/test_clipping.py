"""clip, clip_by_global_norm and global_norm: optax parity, closed forms, validation."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from gradchain.transforms import clip, clip_by_global_norm, clipping
from gradchain.transforms.clipping import global_norm

F64 = torch.float64



# ---------------------------------------------------------------------------------------------
# Reference parity (optax)

@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("max_delta", [0.5, 3.0])
def test_clip_matches_optax(max_delta, kind, optax, assert_matches_optax):
    assert_matches_optax(clip(max_delta), optax.clip(max_delta), kind=kind, rtol=0)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_clip_by_global_norm_below_threshold_matches_optax(kind, optax, assert_matches_optax):
    assert_matches_optax(clip_by_global_norm(1e6), optax.clip_by_global_norm(1e6), kind=kind,
                         rtol=0)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_clip_by_global_norm_above_threshold_matches_optax_in_float64(kind, optax,
                                                                      assert_matches_optax):
    assert_matches_optax(clip_by_global_norm(0.5), optax.clip_by_global_norm(0.5), kind=kind)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_by_global_norm_matches_optax_in_float32(max_norm, optax, assert_matches_optax):
    assert_matches_optax(clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm),
                         dtype=torch.float32, rtol=2e-6, atol=1e-30)


# ---------------------------------------------------------------------------------------------
# Closed forms

def test_clip_bounds_entries_and_keeps_the_rest_bitwise():
    u = torch.tensor([-5.0, -1.0, -0.3, 0.0, 0.999, 1.0, 1.0001, 1e30, float("-inf")], dtype=F64)
    tx = clip(1.0)
    out, _ = tx.update([u.clone()], tx.init([u]))
    assert out[0].tolist() == [-1.0, -1.0, -0.3, 0.0, 0.999, 1.0, 1.0, 1.0, -1.0]
    assert out[0][2].item() == u[2].item()


def test_clip_propagates_nan():
    tx = clip(1.0)
    out, _ = tx.update([torch.tensor([float("nan"), 2.0])], tx.init([torch.zeros(2)]))
    assert math.isnan(out[0][0].item()) and out[0][1].item() == 1.0


def test_clip_by_global_norm_rescales_to_exactly_max_norm_float32():
    # ||(3, 4)|| = 5, factor 1/5: the output is (0.6, 0.8) to the float32 rounding of 1/5
    tx = clip_by_global_norm(1.0)
    out, _ = tx.update([torch.tensor([3.0]), torch.tensor([[4.0]])],
                       tx.init([torch.zeros(1), torch.zeros(1, 1)]))
    torch.testing.assert_close(out[0], torch.tensor([0.6]), rtol=1.2e-7, atol=0)
    torch.testing.assert_close(out[1], torch.tensor([[0.8]]), rtol=1.2e-7, atol=0)


def test_clip_by_global_norm_factor_is_exact_in_float64():
    tx = clip_by_global_norm(2.0)
    u = [torch.tensor([3.0, 0.0], dtype=F64), torch.tensor(4.0, dtype=F64)]
    out, _ = tx.update(u, tx.init(u))
    # 2/5 = 0.4: 0.4 * 3, 0.4 * 4 to float64 rounding
    torch.testing.assert_close(out[0], torch.tensor([1.2, 0.0], dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(out[1], torch.tensor(1.6, dtype=F64), rtol=1e-15, atol=0)


def test_clip_by_global_norm_of_large_float64_updates_does_not_zero_them():
    # ||u|| = 2e100 is an ordinary float64 (optax clips it to 0.5 each); beyond float32's range
    tx = clip_by_global_norm(1.0)
    u = [torch.full((4,), 1e100, dtype=F64)]
    out, _ = tx.update(u, tx.init(u))
    torch.testing.assert_close(out[0], torch.full((4,), 0.5, dtype=F64), rtol=1e-15, atol=0)


def test_clip_by_global_norm_uses_all_leaves_together():
    # each leaf alone is below the threshold, together they are not: ||(3, 4, 12)|| = 13
    tx = clip_by_global_norm(6.5)
    u = [torch.tensor([3.0], dtype=F64), torch.tensor([4.0], dtype=F64),
         torch.tensor([12.0], dtype=F64)]
    out, _ = tx.update(u, tx.init(u))
    torch.testing.assert_close(torch.cat(out), torch.tensor([1.5, 2.0, 6.0], dtype=F64),
                               rtol=1e-7, atol=0)


def test_clip_by_global_norm_below_threshold_is_bitwise_unchanged():
    u = [torch.tensor([0.3, -0.1]), torch.tensor(0.2)]
    tx = clip_by_global_norm(1.0)
    out, _ = tx.update([t.clone() for t in u], tx.init(u))
    assert all(torch.equal(a, b) for a, b in zip(out, u))


def test_clip_by_global_norm_of_zero_updates_stays_zero():
    tx = clip_by_global_norm(1.0)
    out, _ = tx.update([torch.zeros(3), torch.zeros(())], tx.init([torch.zeros(3),
                                                                   torch.zeros(())]))
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


def test_global_norm_is_the_norm_of_all_entries():
    assert global_norm([torch.tensor([3.0]), torch.tensor([[4.0, 12.0]])]).item() == 13.0
    assert global_norm([]).item() == 0.0


def test_global_norm_of_float64_tensors_is_float64():
    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(7, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen, dtype=F64)]
    exact = math.sqrt(sum(float((t * t).sum()) for t in u))
    norm = global_norm(u)
    assert norm.dtype == F64
    assert norm.item() == pytest.approx(exact, rel=1e-15)


# ---------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize("make, name", [(clip, "max_delta"), (clip_by_global_norm, "max_norm")])
@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), "1.0", None])
def test_clipping_rejects_invalid_threshold(make, name, value):
    with pytest.raises(ValueError, match=name):
        make(value)


def test_clipping_docstring_examples_run():
    result = doctest.testmod(clipping)
    assert result.attempted > 0 and result.failed == 0
