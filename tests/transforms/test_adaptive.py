"""scale_by_adam and scale_by_rms (ALGORITHMS.md §0.6): optax parity, closed forms, validation."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from gradchain.core import apply_updates
from gradchain.transforms import (adaptive, add_decayed_weights, scale_by_adam,
                                  scale_by_learning_rate, scale_by_rms)

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# Reference parity (optax 0.2.x, float64), 20 steps of random gradients

ADAM_CASES = {
    "defaults": {},
    "large_eps": dict(b1=0.8, b2=0.95, eps=1e-2),
    "eps_root": dict(b1=0.9, b2=0.99, eps=1e-3, eps_root=1e-2),
    "nesterov": dict(b1=0.9, b2=0.999, eps=1e-3, nesterov=True),
    "nesterov_eps_root": dict(b1=0.7, b2=0.9, eps=1e-4, eps_root=1e-3, nesterov=True),
    "no_momentum": dict(b1=0.0, b2=0.5, eps=1e-3),
}


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("case", ADAM_CASES)
def test_scale_by_adam_matches_optax(case, kind, optax, assert_matches_optax):
    kwargs = ADAM_CASES[case]
    assert_matches_optax(scale_by_adam(**kwargs), optax.scale_by_adam(**kwargs), kind=kind)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("initial_scale", [0.0, 0.5])
def test_scale_by_rms_matches_optax(eps_in_sqrt, bias_correction, initial_scale, optax,
                                    assert_matches_optax):
    kwargs = dict(decay=0.8, eps=1e-3, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt,
                  bias_correction=bias_correction)
    assert_matches_optax(scale_by_rms(**kwargs), optax.scale_by_rms(**kwargs))


def test_scale_by_rms_defaults_match_optax_defaults(optax, assert_matches_optax):
    assert_matches_optax(scale_by_rms(), optax.scale_by_rms(), kind="dict")


# ---------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.1])
def test_first_adam_step_is_u_over_abs_u_plus_eps(eps):
    u = torch.tensor([2.0, -0.5, 3e-3, -7.0], dtype=F64)
    tx = scale_by_adam(b1=0.9, b2=0.999, eps=eps)
    out, _ = tx.update([u.clone()], tx.init([torch.zeros(4, dtype=F64)]))
    expected = torch.tensor([2.0 / (2.0 + eps), -0.5 / (0.5 + eps), 3e-3 / (3e-3 + eps),
                             -7.0 / (7.0 + eps)], dtype=F64)
    torch.testing.assert_close(out[0], expected, rtol=1e-14, atol=0)


def test_first_adam_step_with_eps_root_is_u_over_root_of_u2_plus_eps_root():
    u = torch.tensor([2.0, -0.5], dtype=F64)
    tx = scale_by_adam(eps=0.01, eps_root=0.25)
    out, _ = tx.update([u.clone()], tx.init([torch.zeros(2, dtype=F64)]))
    expected = torch.tensor([2.0 / (math.sqrt(4.25) + 0.01), -0.5 / (math.sqrt(0.5) + 0.01)],
                            dtype=F64)
    torch.testing.assert_close(out[0], expected, rtol=1e-14, atol=0)


def test_adam_output_for_a_constant_gradient_is_the_same_every_step():
    # m-hat = g and v-hat = g^2 exactly at every step, so o = g / (|g| + eps)
    g = torch.tensor([4.0, -0.25, 1e-3], dtype=F64)
    tx = scale_by_adam(b1=0.9, b2=0.99, eps=1e-3)
    state = tx.init([torch.zeros(3, dtype=F64)])
    for _ in range(10):
        out, state = tx.update([g.clone()], state)
        torch.testing.assert_close(out[0], g / (g.abs() + 1e-3), rtol=1e-13, atol=0)


def test_first_nesterov_adam_step_closed_form():
    # m1 = (1-b1) u: b1 m1/(1-b1^2) + (1-b1) u/(1-b1) = u (1 + 2 b1)/(1 + b1), over |u| + eps
    b1, eps = 0.5, 0.25
    u = torch.tensor([2.0, -1.0], dtype=F64)
    tx = scale_by_adam(b1=b1, b2=0.999, eps=eps, nesterov=True)
    out, _ = tx.update([u.clone()], tx.init([torch.zeros(2, dtype=F64)]))
    expected = u * (1 + 2 * b1) / (1 + b1) / (u.abs() + eps)
    torch.testing.assert_close(out[0], expected, rtol=1e-14, atol=0)


def test_adam_state_holds_the_uncorrected_moments():
    u1, u2 = torch.tensor([2.0], dtype=F64), torch.tensor([-1.0], dtype=F64)
    tx = scale_by_adam(b1=0.5, b2=0.75)
    state = tx.init([torch.zeros(1, dtype=F64)])
    _, state = tx.update([u1], state)
    _, state = tx.update([u2], state)
    assert state.count == 2
    m2 = 0.5 * (0.5 * 2.0) + 0.5 * -1.0
    v2 = 0.75 * (0.25 * 4.0) + 0.25 * 1.0
    torch.testing.assert_close(state.mu[0], torch.tensor([m2], dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(state.nu[0], torch.tensor([v2], dtype=F64), rtol=1e-15, atol=0)


def test_rms_with_zero_decay_and_eps_is_the_sign():
    u = torch.tensor([2.0, -3.0, 0.5], dtype=F64)
    tx = scale_by_rms(decay=0.0, eps=0.0)
    out, _ = tx.update([u.clone()], tx.init([torch.zeros(3, dtype=F64)]))
    torch.testing.assert_close(out[0], torch.sign(u), rtol=0, atol=0)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_first_rms_step_closed_form_with_initial_scale(eps_in_sqrt):
    beta, eps, s = 0.75, 0.01, 0.5
    u = torch.tensor([2.0, -0.5], dtype=F64)
    tx = scale_by_rms(decay=beta, eps=eps, initial_scale=s, eps_in_sqrt=eps_in_sqrt)
    out, _ = tx.update([u.clone()], tx.init([torch.zeros(2, dtype=F64)]))
    v = [beta * s + (1 - beta) * 4.0, beta * s + (1 - beta) * 0.25]
    denom = [math.sqrt(x + eps) if eps_in_sqrt else math.sqrt(x) + eps for x in v]
    expected = torch.tensor([2.0 / denom[0], -0.5 / denom[1]], dtype=F64)
    torch.testing.assert_close(out[0], expected, rtol=1e-14, atol=0)


def test_bias_corrected_rms_of_a_constant_gradient_is_constant():
    # v-hat = g^2 exactly with bias correction and v0 = 0: o = g / (|g| + eps) every step
    g = torch.tensor([3.0, -0.2], dtype=F64)
    tx = scale_by_rms(decay=0.9, eps=1e-2, eps_in_sqrt=False, bias_correction=True)
    state = tx.init([torch.zeros(2, dtype=F64)])
    for _ in range(8):
        out, state = tx.update([g.clone()], state)
        torch.testing.assert_close(out[0], g / (g.abs() + 1e-2), rtol=1e-13, atol=0)


def test_rms_initial_scale_fills_the_second_moment():
    tx = scale_by_rms(initial_scale=0.25)
    state = tx.init({"a": torch.zeros(2, 3, dtype=F64)})
    assert state.count == 0
    torch.testing.assert_close(state.nu[0], torch.full((2, 3), 0.25, dtype=F64), rtol=0, atol=0)


def test_rms_then_learning_rate_matches_torch_rmsprop():
    # the docstring's claim: torch.optim.RMSprop(alpha) = scale_by_rms(alpha, eps_in_sqrt=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=gen, dtype=F64)
    ref = torch.nn.Parameter(x.clone())
    opt = torch.optim.RMSprop([ref], lr=0.01, alpha=0.99, eps=1e-3)
    rms, lr = scale_by_rms(decay=0.99, eps=1e-3, eps_in_sqrt=False), scale_by_learning_rate(0.01)
    params = [x.clone()]
    s_rms, s_lr = rms.init(params), lr.init(params)
    for _ in range(20):
        g = torch.randn(4, 3, generator=gen, dtype=F64)
        ref.grad = g.clone()
        opt.step()
        u, s_rms = rms.update([g.clone()], s_rms, params)
        u, s_lr = lr.update(u, s_lr, params)
        apply_updates(params, u)
        torch.testing.assert_close(params[0], ref.detach(), rtol=1e-13, atol=1e-15)


def test_adam_decay_learning_rate_in_sequence_matches_torch_adamw():
    # ALGORITHMS.md §11.2 with the transforms applied one after another by hand (no chain).
    # lr and weight decay are powers of two so that torch's 1 - lr * wd is exact.
    lr, wd, eps = 2.0**-6, 2.0**-3, 1e-3
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    ref = torch.nn.Parameter(x.clone())
    opt = torch.optim.AdamW([ref], lr=lr, betas=(0.8, 0.95), eps=eps, weight_decay=wd)
    txs = [scale_by_adam(0.8, 0.95, eps), add_decayed_weights(wd), scale_by_learning_rate(lr)]
    params = [x.clone()]
    states = [tx.init(params) for tx in txs]
    for _ in range(20):
        g = torch.randn(5, 2, generator=gen, dtype=F64)
        ref.grad = g.clone()
        opt.step()
        u = [g.clone()]
        for i, tx in enumerate(txs):
            u, states[i] = tx.update(u, states[i], params)
        apply_updates(params, u)
        torch.testing.assert_close(params[0], ref.detach(), rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=-0.1), "b1"), (dict(b1=1.0), "b1"), (dict(b1=float("nan")), "b1"),
    (dict(b1="0.9"), "b1"), (dict(b1=True), "b1"), (dict(b1=None), "b1"),
    (dict(b2=1.0), "b2"), (dict(b2=1.5), "b2"), (dict(b2=float("nan")), "b2"),
    (dict(eps=-1e-8), "eps"), (dict(eps=float("nan")), "eps"), (dict(eps="1e-8"), "eps"),
    (dict(eps_root=-1.0), "eps_root"), (dict(eps_root=float("nan")), "eps_root"),
])
def test_scale_by_adam_rejects_invalid_hyperparameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        scale_by_adam(**kwargs)


def test_scale_by_rms_bias_correction_with_a_schedule_uses_its_product():
    gen = torch.Generator().manual_seed(3)
    fixed, scheduled = scale_by_rms(0.9, bias_correction=True), \
        scale_by_rms(lambda count: 0.9, bias_correction=True)
    params = [torch.zeros(5, dtype=F64)]
    a, b = fixed.init(params), scheduled.init(params)
    for _ in range(4):
        u = torch.randn(5, generator=gen, dtype=F64)
        (x,), a = fixed.update([u.clone()], a)
        (y,), b = scheduled.update([u.clone()], b)
        torch.testing.assert_close(x, y, rtol=1e-15, atol=0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(decay=1.0), "decay"), (dict(decay=-0.1), "decay"), (dict(decay=float("nan")), "decay"),
    (dict(decay="0.9"), "decay"), (dict(eps=-1.0), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(initial_scale=-0.5), "initial_scale"), (dict(initial_scale=float("nan")),
                                                  "initial_scale"),
])
def test_scale_by_rms_rejects_invalid_hyperparameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_rms(**kwargs)


def test_adaptive_docstring_examples_run():
    result = doctest.testmod(adaptive)
    assert result.attempted > 0 and result.failed == 0
