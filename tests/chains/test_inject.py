"""inject_hyperparams: scheduled hyperparameters, their record in the state, static arguments,
and parity with optax.inject_hyperparams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradchain.chains import adam, adamw, chain, inject_hyperparams
from gradchain.core import EmptyState, GradientTransformation, apply_updates
from gradchain.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_schedule,
)
from chain_helpers import clone as _clone, grads as _grads, params as _params








def _lr(count: int) -> float:
    return 0.1 * (count + 1)


def _b1(count: int) -> float:
    return 0.5 + 0.04 * count


def test_scheduled_learning_rate_scales_by_its_value_at_each_step():
    tx = inject_hyperparams(scale_by_learning_rate)(learning_rate=_lr)
    params = _params()
    state = tx.init(params)
    for step in range(4):
        g = _grads(step)
        out, state = tx.update(_clone(g), state, params)
        for k in g:
            torch.testing.assert_close(out[k], -_lr(step) * g[k], rtol=1e-15, atol=0)


def test_scheduled_b1_equals_rebuilding_adam_with_current_value_each_step():
    tx = inject_hyperparams(scale_by_adam)(b1=_b1, b2=0.99)
    params = _params()
    state = tx.init(params)
    manual_state = scale_by_adam().init(params)
    for step in range(5):
        g = _grads(step)
        out, state = tx.update(_clone(g), state, params)
        manual, manual_state = scale_by_adam(b1=_b1(step), b2=0.99).update(
            _clone(g), manual_state, params)
        for k in g:
            assert torch.equal(out[k], manual[k])


def test_scheduled_b1_matches_adam_closed_form_with_current_b1():
    b2, eps = 0.99, 1e-8
    tx = inject_hyperparams(scale_by_adam)(b1=_b1, b2=b2, eps=eps)
    params = _params()
    state = tx.init(params)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(v) for k, v in params.items()}
    for step in range(5):
        g = _grads(step)
        out, state = tx.update(_clone(g), state, params)
        b1, t = _b1(step), step + 1
        for k in g:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            expected = (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + eps)
            torch.testing.assert_close(out[k], expected, rtol=1e-12, atol=0)


def test_state_hyperparams_record_the_values_used_at_each_step():
    tx = inject_hyperparams(scale_by_adam)(b1=_b1, b2=0.99)
    params = _params()
    state = tx.init(params)
    assert state.count == 0
    assert state.hyperparams == {"b1": _b1(0), "b2": 0.99, "eps": 1e-8, "eps_root": 0.0}
    for step in range(4):
        _, state = tx.update(_grads(step), state, params)
        assert state.count == step + 1
        assert state.hyperparams["b1"] == _b1(step)
        assert state.hyperparams["b2"] == 0.99
        assert state.inner.count == step + 1
    assert "nesterov" not in state.hyperparams  # a bool default is not a hyperparameter


def test_callable_mask_argument_is_passed_through_not_scheduled():
    def decay(count):
        return 0.1 * (count + 1)

    def mask(name, p):
        return name == "w"

    tx = inject_hyperparams(add_decayed_weights)(weight_decay=decay, mask=mask)
    params = _params()
    state = tx.init(params)
    for step in range(3):
        g = _grads(step)
        out, state = tx.update(_clone(g), state, params)
        torch.testing.assert_close(out["w"], g["w"] + decay(step) * params["w"],
                                   rtol=1e-15, atol=0)
        assert torch.equal(out["b"], g["b"])
        assert set(state.hyperparams) == {"weight_decay"}
        assert state.hyperparams["weight_decay"] == decay(step)


def test_adamw_recipe_mask_is_not_scheduled_but_learning_rate_is():
    tx = inject_hyperparams(adamw)(learning_rate=_lr, weight_decay=0.5,
                                   mask=lambda name, p: p.ndim >= 2)
    params = _params()
    state = tx.init(params)
    assert "mask" not in state.hyperparams
    g = _grads(0)
    out, state = tx.update(_clone(g), state, params)
    # first Adam step: m-hat / (sqrt(v-hat) + eps) = g / (|g| + eps)
    direction = {k: g[k] / (g[k].abs() + 1e-8) for k in g}
    torch.testing.assert_close(out["w"], -_lr(0) * (direction["w"] + 0.5 * params["w"]),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(out["b"], -_lr(0) * direction["b"], rtol=1e-12, atol=0)
    assert state.hyperparams["learning_rate"] == _lr(0)


def test_static_args_keep_a_callable_argument_callable():
    def halve(count):
        return 0.5 ** (count + 1)

    tx = inject_hyperparams(scale_by_schedule, static_args=("schedule",))(schedule=halve)
    params = _params()
    state = tx.init(params)
    assert state.hyperparams == {}
    for step in range(3):
        g = _grads(step)
        out, state = tx.update(_clone(g), state, params)
        for k in g:
            torch.testing.assert_close(out[k], halve(step) * g[k], rtol=0, atol=0)


def test_callable_without_static_args_is_resolved_to_a_number():
    # scale_by_schedule refuses a number, so resolving the schedule shows up as its error
    with pytest.raises(ValueError, match="callable"):
        inject_hyperparams(scale_by_schedule)(schedule=lambda count: 1.0)


def test_static_scheduled_decay_is_not_recorded():
    tx = inject_hyperparams(scale_by_rms, static_args=("decay",))(decay=lambda c: 0.9)
    assert "decay" not in tx.init(_params()).hyperparams
    tx = inject_hyperparams(scale_by_rms)(decay=lambda c: 0.9)
    assert tx.init(_params()).hyperparams["decay"] == 0.9


def test_positional_hyperparameters_are_bound_by_name():
    tx = inject_hyperparams(scale_by_adam)(0.5, 0.9)
    state = tx.init(_params())
    assert state.hyperparams["b1"] == 0.5 and state.hyperparams["b2"] == 0.9


def test_flags_follow_the_built_transform():
    assert inject_hyperparams(scale_by_adam)(b1=_b1).leafwise
    assert not inject_hyperparams(clip_by_global_norm)(max_norm=1.0).leafwise

    def terminal_factory(lr: float = 0.1) -> GradientTransformation:
        return GradientTransformation(lambda p: EmptyState(),
                                      lambda u, s, p=None, **e: (u, s), terminal=True)

    assert inject_hyperparams(terminal_factory)(lr=_lr).terminal


def test_inject_hyperparams_adam_matches_optax_with_schedules_over_10_steps():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def lr(count):
        return 0.05 / (1.0 + 0.3 * count)

    ours = inject_hyperparams(adam)(learning_rate=lr, b1=_b1, b2=0.98)
    ref = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float64)(
        learning_rate=lr, b1=_b1, b2=0.98)
    ref_update = jax.jit(ref.update)
    params = _params()
    p_ref = {k: jnp.asarray(v.numpy()) for k, v in params.items()}
    s_ours, s_ref = ours.init(params), ref.init(p_ref)
    for step in range(10):
        g = _grads(step)
        o_ours, s_ours = ours.update(_clone(g), s_ours, params)
        o_ref, s_ref = ref_update({k: jnp.asarray(v.numpy()) for k, v in g.items()}, s_ref,
                                  p_ref)
        apply_updates(params, o_ours)
        p_ref = optax.apply_updates(p_ref, o_ref)
        for k in g:
            torch.testing.assert_close(o_ours[k], torch.from_numpy(np.array(o_ref[k])),
                                       rtol=1e-12, atol=1e-15)
        for name in ("learning_rate", "b1", "b2"):
            assert s_ours.hyperparams[name] == pytest.approx(
                float(s_ref.hyperparams[name]), rel=1e-15)
    for k in params:
        torch.testing.assert_close(params[k], torch.from_numpy(np.array(p_ref[k])),
                                   rtol=1e-12, atol=1e-15)


def test_inject_hyperparams_inside_chain_sees_chain_extras():
    seen = []

    def factory(factor: float = 1.0) -> GradientTransformation:
        def update(u, s, p=None, **extras):
            seen.append(extras.get("loss"))
            return u, s
        return GradientTransformation(lambda p: EmptyState(), update)

    tx = chain(inject_hyperparams(factory)(factor=_lr))
    params = _params()
    tx.update(_grads(0), tx.init(params), params, loss=3.0)
    assert seen == [3.0]
