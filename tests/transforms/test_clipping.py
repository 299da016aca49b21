"""clip, clip_by_global_norm, clip_by_agc and global_norm: optax parity, closed forms (AGC:
ALGORITHMS.md §0.6, §11.33), validation."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from gradchain.transforms import clip, clip_by_global_norm, clipping
from gradchain.chains import chain
from gradchain.core import EmptyState
from gradchain.transforms.clipping import clip_by_agc, global_norm

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
# clip_by_agc (ALGORITHMS.md §0.6, §11.33)


def _agc(tx, u, x, **extras):
    return tx.update(u, tx.init(x), x, **extras)[0]


def test_agc_scales_a_large_update_to_clip_times_the_parameter_norm():
    # ||x|| = 2, ||g|| = 10, clip 0.1: s = 0.1 * 2 / 10 = 0.02
    x = [torch.tensor([[0.0, 2.0]], dtype=F64)]
    g = [torch.tensor([[6.0, -8.0]], dtype=F64)]
    out = _agc(clip_by_agc(0.1), g, x)
    torch.testing.assert_close(out[0], g[0] * 0.02, rtol=1e-15, atol=0)
    assert torch.linalg.vector_norm(out[0]).item() == pytest.approx(0.2, rel=1e-15)


@pytest.mark.parametrize("norm", [0.2, 0.1, 1e-6])
def test_agc_leaves_updates_within_the_bound_bitwise_unchanged(norm):
    # ||g|| <= 0.1 max(||x||, 1e-3) = 0.2
    x = [torch.tensor([0.0, 2.0], dtype=F64)]
    g = [torch.tensor([0.6, -0.8], dtype=F64) * norm]
    out = _agc(clip_by_agc(0.1), [g[0].clone()], x)
    assert torch.equal(out[0], g[0])


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_agc_with_clip_at_most_zero_is_the_identity(value):
    g = [torch.full((3,), 1e6)]
    tx = clip_by_agc(value)
    out, state = tx.update(g, tx.init([torch.zeros(3)]))  # params are not needed then
    assert out[0] is g[0] and state == EmptyState()


def test_agc_uses_min_param_norm_for_zero_parameters():
    x = [torch.zeros(4, dtype=F64)]
    g = [torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=F64)]
    out = _agc(clip_by_agc(0.1, min_param_norm=1e-3), g, x)
    torch.testing.assert_close(out[0], g[0] * (0.1 * 1e-3 / 5.0), rtol=1e-15, atol=0)
    out = _agc(clip_by_agc(0.1, min_param_norm=0.5), g, x)
    torch.testing.assert_close(out[0], g[0] * 0.01, rtol=1e-15, atol=0)


def test_agc_clips_every_parameter_by_its_own_norms():
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 4), (5,), (), (2, 1, 3)]
    x = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    x[1] = torch.zeros(5, dtype=F64)
    scales = [10.0, 1e-2, 1e-3, 0.01]  # clipped, clipped via min_param_norm, kept, kept
    g = [torch.randn(s, generator=gen, dtype=F64) * c for s, c in zip(shapes, scales)]
    out = _agc(clip_by_agc(0.05, min_param_norm=1e-2, eps=1e-8), [t.clone() for t in g], x)
    for xi, gi, oi in zip(x, g, out):
        bound = 0.05 * max(torch.linalg.vector_norm(xi).item(), 1e-2)
        factor = min(1.0, bound / max(torch.linalg.vector_norm(gi).item(), 1e-8))
        torch.testing.assert_close(oi, gi * factor, rtol=1e-14, atol=0)
    assert [torch.equal(o, t) for o, t in zip(out, g)] == [False, False, True, True]


def test_agc_of_a_zero_update_stays_zero():
    out = _agc(clip_by_agc(0.1), [torch.zeros(3)], [torch.zeros(3)])
    assert torch.equal(out[0], torch.zeros(3))
    # eps guards 0 / 0 when nothing else does
    out = _agc(clip_by_agc(0.1, min_param_norm=0.0), [torch.zeros(3)], [torch.zeros(3)])
    assert torch.equal(out[0], torch.zeros(3))


def test_agc_eps_floors_the_update_norm():
    # ||x|| = 2, ||g|| = 0.5: s = 0.1 * 2 / max(0.5, 1) = 0.2 (0.4 without the floor)
    x, g = [torch.tensor([2.0, 0.0], dtype=F64)], [torch.tensor([0.3, 0.4], dtype=F64)]
    out = _agc(clip_by_agc(0.1, eps=1.0), g, x)
    torch.testing.assert_close(out[0], g[0] * 0.2, rtol=1e-15, atol=0)


def test_agc_norms_of_bf16_parameters_are_taken_in_float32():
    # ||1_3|| = sqrt(3) = 1.7320508; rounded to bfloat16 it would be 1.734375 (0.13% off)
    x = [torch.ones(3, dtype=torch.bfloat16)]
    g = [torch.full((3,), 10.0)]
    out = _agc(clip_by_agc(0.1), g, x)
    assert out[0].dtype == torch.float32
    expected = 10.0 * 0.1 * math.sqrt(3.0) / math.sqrt(300.0)
    torch.testing.assert_close(out[0], torch.full((3,), expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("in_chain", [False, True], ids=["grads_extra", "chain"])
def test_agc_does_not_overwrite_the_raw_gradient(in_chain):
    x = [torch.ones(2)]
    g = [torch.tensor([30.0, 40.0])]
    tx = chain(clip_by_agc(0.1)) if in_chain else clip_by_agc(0.1)
    out = tx.update(g, tx.init(x), x)[0] if in_chain else _agc(tx, g, x, grads=g)
    assert g[0].tolist() == [30.0, 40.0]
    torch.testing.assert_close(out[0], torch.tensor([30.0, 40.0]) * (0.1 * math.sqrt(2) / 50),
                               rtol=1e-6, atol=0)


def test_agc_without_params_says_it_needs_them():
    tx = clip_by_agc(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update([torch.ones(2)], tx.init([torch.ones(2)]))


def test_agc_is_leafwise_not_elementwise_and_stateless():
    tx = clip_by_agc()
    assert tx.leafwise and not tx.elementwise and not tx.terminal
    x = [torch.ones(2)]
    assert tx.init(x) == EmptyState()
    assert tx.update([torch.ones(2)], tx.init(x), x)[1] == EmptyState()


def test_agc_keeps_dict_trees():
    x = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    g = {"w": torch.full((2, 2), 5.0), "b": torch.full((2,), 1e-6)}
    out = _agc(clip_by_agc(0.1), g, x)
    assert list(out) == ["w", "b"]
    torch.testing.assert_close(out["w"], torch.full((2, 2), 0.1), rtol=1e-6, atol=0)
    assert torch.equal(out["b"], g["b"])


def test_agc_rejects_sparse_updates_naming_itself():
    sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (2,),
                                     check_invariants=True)
    tx = clip_by_agc()
    with pytest.raises(ValueError, match="clip_by_agc does not support sparse"):
        tx.update([sparse], tx.init([torch.ones(2)]), [torch.ones(2)])


@pytest.mark.parametrize("kwargs, name", [
    (dict(clip=float("nan")), "clip"), (dict(clip="0.1"), "clip"), (dict(clip=None), "clip"),
    (dict(clip=lambda count: 0.1), "clip"), (dict(min_param_norm=-1e-3), "min_param_norm"),
    (dict(min_param_norm=float("nan")), "min_param_norm"), (dict(eps=-1e-8), "eps"),
    (dict(eps=float("nan")), "eps"),
])
def test_agc_rejects_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        clip_by_agc(**kwargs)


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
