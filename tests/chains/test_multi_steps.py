"""multi_steps: gradient accumulation, the inner transform applied once every k calls to the
mean, and parity with optax.MultiSteps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradchain.chains import chain, multi_steps
from gradchain.core import EmptyState, GradientTransformation, apply_updates
from gradchain.transforms import scale, scale_by_adam, scale_by_learning_rate, trace
from chain_helpers import clone as _clone, grads as _grads, params as _params








def _spy(log: list) -> GradientTransformation:
    def update(updates, state, params=None, **extras):
        log.append({"updates": _clone(updates), "grads": _clone(extras["grads"]),
                    "loss": extras.get("loss")})
        return updates, state

    return GradientTransformation(lambda p: EmptyState(), update, leafwise=True)


def test_outputs_zeros_then_the_mean_every_k_calls():
    k = 3
    log: list = []
    tx = multi_steps(_spy(log), every_k=k)
    params = _params()
    state = tx.init(params)
    for window in range(3):
        grads = [_grads(10 * window + j) for j in range(k)]
        for j, g in enumerate(grads):
            out, state = tx.update(_clone(g), state, params)
            if j < k - 1:
                for name in g:
                    assert torch.equal(out[name], torch.zeros_like(g[name]))
            else:
                for name in g:
                    mean = (grads[0][name] + grads[1][name] + grads[2][name]) / 3
                    torch.testing.assert_close(out[name], mean, rtol=1e-15, atol=1e-16)
        assert len(log) == window + 1
    for record in log:
        for name in record["updates"]:
            assert torch.equal(record["grads"][name], record["updates"][name])


def test_inner_runs_once_per_window_and_counts_its_own_steps():
    k = 4
    tx = multi_steps(chain(trace(0.5), scale_by_adam()), every_k=k)
    params = _params()
    state = tx.init(params)
    for call in range(1, 13):
        _, state = tx.update(_grads(call), state, params)
        assert state.mini_step == call % k
        assert state.inner[0].count == call // k
        assert state.inner[1].count == call // k


def test_accumulator_is_cleared_after_each_window():
    tx = multi_steps(scale(1.0), every_k=2)
    params = _params()
    state = tx.init(params)
    for step in range(2):
        _, state = tx.update(_grads(step), state, params)
    assert state.mini_step == 0
    for a in state.accumulated:
        assert torch.equal(a, torch.zeros_like(a))
    g2, g3 = _grads(2), _grads(3)
    _, state = tx.update(_clone(g2), state, params)
    out, state = tx.update(_clone(g3), state, params)
    for name in g2:
        torch.testing.assert_close(out[name], (g2[name] + g3[name]) / 2, rtol=1e-15, atol=0)


def test_every_k_of_one_equals_the_inner_transform():
    inner = chain(scale_by_adam(), scale_by_learning_rate(0.1))
    tx = multi_steps(chain(scale_by_adam(), scale_by_learning_rate(0.1)), every_k=1)
    params = _params()
    s_tx, s_inner = tx.init(params), inner.init(params)
    for step in range(4):
        g = _grads(step)
        out, s_tx = tx.update(_clone(g), s_tx, params)
        expected, s_inner = inner.update(_clone(g), s_inner, params)
        for name in g:
            assert torch.equal(out[name], expected[name])


@pytest.mark.parametrize("every_k", [0, -1, 2.0, "3"])
def test_invalid_every_k_is_refused(every_k):
    with pytest.raises(ValueError, match="every_k"):
        multi_steps(scale(1.0), every_k)


def test_multi_steps_never_modifies_the_gradients_it_is_given():
    tx = chain(multi_steps(chain(trace(0.9), scale(2.0)), every_k=2))
    params = _params()
    state = tx.init(params)
    for step in range(4):
        g = _grads(step)
        before = _clone(g)
        out, state = tx.update(g, state, params)
        for name in g:
            assert torch.equal(g[name], before[name])
            assert out[name] is not g[name]


def test_inner_sees_other_extras_unchanged():
    log: list = []
    tx = chain(multi_steps(_spy(log), every_k=2))
    params = _params()
    state = tx.init(params)
    for step in range(2):
        _, state = tx.update(_grads(step), state, params, loss=float(step))
    assert [r["loss"] for r in log] == [1.0]


def test_state_has_one_accumulator_per_parameter_in_state_dtype():
    params = [torch.zeros(2, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.float64)]
    state = multi_steps(scale(1.0), every_k=2).init(params)
    assert [a.dtype for a in state.accumulated] == [torch.float32, torch.float64]
    assert [a.shape for a in state.accumulated] == [(2,), (3,)]


def test_flags_follow_inner():
    assert multi_steps(scale_by_adam(), 2).leafwise
    term = GradientTransformation(lambda p: (), lambda u, s, p=None, **e: (u, s), terminal=True)
    assert multi_steps(term, 2).terminal


def test_multi_steps_adam_matches_optax_multisteps_over_12_steps():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    lr, k = 0.1, 3
    bare = multi_steps(chain(scale_by_adam(b1=0.8, b2=0.9), scale_by_learning_rate(lr)),
                       every_k=k)
    nested = chain(multi_steps(chain(scale_by_adam(b1=0.8, b2=0.9),
                                     scale_by_learning_rate(lr)), every_k=k))
    ref = optax.MultiSteps(optax.adam(lr, b1=0.8, b2=0.9), every_k_schedule=k,
                           accumulator_dtype=jnp.float64)
    ref_update = jax.jit(ref.update)
    params = {"bare": _params(), "nested": _params()}
    p_ref = {name: jnp.asarray(v.numpy()) for name, v in _params().items()}
    states = {"bare": bare.init(params["bare"]), "nested": nested.init(params["nested"])}
    s_ref = ref.init(p_ref)
    for step in range(12):
        g = _grads(step)
        o_ref, s_ref = ref_update({n: jnp.asarray(v.numpy()) for n, v in g.items()}, s_ref,
                                  p_ref)
        p_ref = optax.apply_updates(p_ref, o_ref)
        for which, tx in (("bare", bare), ("nested", nested)):
            out, states[which] = tx.update(_clone(g), states[which], params[which])
            apply_updates(params[which], out)
            for name in g:
                expected = torch.from_numpy(np.array(o_ref[name]))
                torch.testing.assert_close(out[name], expected, rtol=1e-12, atol=1e-15)
                if (step + 1) % k:
                    assert not out[name].any()
                else:
                    assert out[name].abs().min() > 0
    for which in params:
        for name in params[which]:
            torch.testing.assert_close(params[which][name],
                                       torch.from_numpy(np.array(p_ref[name])),
                                       rtol=1e-12, atol=1e-15)
