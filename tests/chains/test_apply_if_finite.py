"""apply_if_finite: non-finite steps output zeros and leave the inner state untouched; the skip
counters; FloatingPointError once training is stuck."""

from __future__ import annotations

import math

import pytest
import torch

from gradchain.chains import apply_if_finite, chain
from gradchain.core import GradientTransformation, all_finite
from gradchain.transforms import scale_by_adam, scale_by_learning_rate, trace
from chain_helpers import clone as _clone, grads, params








def _params() -> dict[str, torch.Tensor]:
    return params(torch.float32)


def _grads(step: int) -> dict[str, torch.Tensor]:
    return grads(step, torch.float32)


def _poisoned(step: int, name: str, value: float) -> dict[str, torch.Tensor]:
    g = _grads(step)
    g[name].view(-1)[1] = value
    return g


def _inner() -> GradientTransformation:
    return chain(trace(0.9), scale_by_adam(), scale_by_learning_rate(0.1))


def _snapshot(inner_state):
    momentum, adam, lr = inner_state
    return (momentum.count, [t.clone() for t in momentum.momentum], adam.count,
            [t.clone() for t in adam.mu], [t.clone() for t in adam.nu])


def _assert_same(snapshot, inner_state):
    momentum, adam, _ = inner_state
    count_m, buf, count_a, mu, nu = snapshot
    assert momentum.count == count_m and adam.count == count_a
    for a, b in zip(buf + mu + nu, momentum.momentum + adam.mu + adam.nu):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["w", "b"])
def test_non_finite_leaf_gives_zeros_and_leaves_inner_state_untouched(name, value):
    tx = apply_if_finite(_inner(), max_consecutive_skips=5)
    params = _params()
    state = tx.init(params)
    _, state = tx.update(_grads(0), state, params)
    before = _snapshot(state.inner)
    out, state = tx.update(_poisoned(1, name, value), state, params)
    for k, v in out.items():
        assert torch.equal(v, torch.zeros_like(params[k]))
    _assert_same(before, state.inner)
    assert state.consecutive_skips == 1 and state.total_skips == 1


def test_finite_steps_equal_the_inner_transform_around_a_skipped_step():
    tx = apply_if_finite(_inner())
    inner = _inner()
    params = _params()
    state, inner_state = tx.init(params), inner.init(params)
    for step in range(4):
        if step == 2:
            _, state = tx.update(_poisoned(step, "w", math.nan), state, params)
            continue
        g = _grads(step)
        out, state = tx.update(_clone(g), state, params)
        expected, inner_state = inner.update(_clone(g), inner_state, params)
        for k in g:
            assert torch.equal(out[k], expected[k])


def test_counters_count_skips_and_a_finite_step_resets_the_consecutive_count():
    tx = apply_if_finite(_inner(), max_consecutive_skips=3)
    params = _params()
    state = tx.init(params)
    assert (state.consecutive_skips, state.total_skips) == (0, 0)
    history = []
    for step, bad in enumerate([True, True, False, True, False, False, True]):
        g = _poisoned(step, "b", math.inf) if bad else _grads(step)
        _, state = tx.update(g, state, params)
        history.append((state.consecutive_skips, state.total_skips))
    assert history == [(1, 1), (2, 2), (0, 2), (1, 3), (0, 3), (0, 3), (1, 4)]
    momentum, adam, _ = state.inner
    assert adam.count == 3 and momentum.count == 3


@pytest.mark.parametrize("max_skips", [0, 1, 3])
def test_raises_after_max_consecutive_skips_plus_one_non_finite_steps(max_skips):
    tx = apply_if_finite(_inner(), max_consecutive_skips=max_skips)
    params = _params()
    state = tx.init(params)
    _, state = tx.update(_grads(0), state, params)
    for step in range(max_skips):
        _, state = tx.update(_poisoned(step, "w", math.nan), state, params)
        assert state.consecutive_skips == step + 1
    with pytest.raises(FloatingPointError, match=f"{max_skips + 1} consecutive"):
        tx.update(_poisoned(99, "w", math.nan), state, params)


def test_zero_max_skips_raises_on_the_first_non_finite_step():
    tx = apply_if_finite(_inner(), max_consecutive_skips=0)
    params = _params()
    with pytest.raises(FloatingPointError):
        tx.update(_poisoned(0, "b", -math.inf), tx.init(params), params)


def test_interrupted_skip_runs_never_raise():
    tx = apply_if_finite(_inner(), max_consecutive_skips=2)
    params = _params()
    state = tx.init(params)
    for step in range(12):
        bad = step % 3 != 2
        g = _poisoned(step, "w", math.nan) if bad else _grads(step)
        _, state = tx.update(g, state, params)
    assert state.total_skips == 8


@pytest.mark.parametrize("max_skips", [-1, 1.5, None])
def test_invalid_max_consecutive_skips_is_refused(max_skips):
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        apply_if_finite(_inner(), max_consecutive_skips=max_skips)


def test_huge_finite_values_are_not_skipped():
    tx = apply_if_finite(_inner())
    params = _params()
    g = _grads(0)
    g["w"].fill_(3e38)  # its squared norm overflows float32; the values themselves are finite
    _, state = tx.update(g, tx.init(params), params)
    assert state.total_skips == 0


def test_bfloat16_gradients_with_nan_are_skipped_inside_a_chain():
    tx = chain(apply_if_finite(scale_by_adam()))
    params = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    g = {"w": torch.tensor([1.0, math.nan, 2.0, 3.0], dtype=torch.bfloat16)}
    out, state = tx.update(g, tx.init(params), params)
    assert torch.equal(out["w"], torch.zeros(4))
    assert state[0].total_skips == 1 and state[0].inner.count == 0


def test_apply_if_finite_is_not_leafwise():
    # the decision to skip is global: it must see every parameter at once
    assert not apply_if_finite(scale_by_adam()).leafwise


def test_zero_element_parameter_does_not_break_the_finite_check():
    tx = apply_if_finite(scale_by_adam())
    params = [torch.zeros(0), torch.zeros(2)]
    out, state = tx.update([torch.zeros(0), torch.ones(2)], tx.init(params), params)
    assert out[0].shape == (0,) and state.total_skips == 0


@pytest.mark.parametrize("dtype, large", [(torch.float16, 6e4), (torch.bfloat16, 3e38),
                                          (torch.float32, 3e38), (torch.float64, 1e300)])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_all_finite_is_exact_where_the_fast_two_norm_overflows(dtype, large, bad):
    # every tensor's 2-norm overflows its dtype; only a non-finite entry may give False
    tensors = [torch.full((64,), large, dtype=dtype), torch.zeros(0, dtype=dtype),
               torch.full((3, 5), -large, dtype=dtype)]
    if bad is not None:
        tensors[2][1, 4] = bad
    assert all_finite(tensors) is (bad is None)
    assert all_finite([t / large for t in tensors]) is (bad is None)  # the fast path
