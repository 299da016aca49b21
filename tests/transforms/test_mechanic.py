"""mechanic_scale (ALGORITHMS.md §6, §10 row 26, §11 items 22-25): step-by-step parity with
``optax.contrib.mechanize`` and ``mechanic_pytorch``, the first-step closed forms, the
invariants, the lr x s_init invariance, store_delta, dtypes, memory and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradchain.chains.combinators import chain, partition
from gradchain.core import apply_updates
from gradchain.transforms import scale, scale_by_adam, scale_by_learning_rate, trace
from gradchain.transforms.mechanic import (DEFAULT_BETAS, MechanicState, mechanic_scale,
                                           mechanic_scale_value)

F64 = torch.float64


def noisy_quadratic(seed: int = 0, dim: int = 6, steps: int = 60, noise: float = 10.0):
    """A PSD matrix, a start and additive gradient noise: g_t(x) = A x + noise_t. Large noise
    makes h change sign, so optax's reward r goes negative and its clipping matters."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim), rng.standard_normal(dim), \
        noise * rng.standard_normal((steps, dim))


def mechanic_state(state) -> MechanicState:
    """The mechanic member's state of a chain, with a copy of delta (updated in place)."""
    mech = state[-1] if not isinstance(state, MechanicState) else state
    return mech if mech.delta is None else mech._replace(delta=[d.clone() for d in mech.delta])


def run_chain(tx, x0, grad_fn, steps, dtype=F64, split=None):
    """Apply ``tx`` to the parameters ``x0`` (split into leaves of sizes ``split``); returns
    the flat parameters after every step and the states."""
    flat = torch.as_tensor(x0, dtype=dtype)
    params = list(flat.split(split)) if split else [flat.clone()]
    params = [p.clone() for p in params]
    state = tx.init(params)
    trajectory, states = [], []
    for t in range(steps):
        x = torch.cat([p.reshape(-1) for p in params])
        g = torch.as_tensor(grad_fn(x.double().numpy(), t), dtype=dtype)
        grads = list(g.split(split)) if split else [g]
        out, state = tx.update(grads, state, params)
        apply_updates(params, out)
        trajectory.append(torch.cat([p.reshape(-1) for p in params]).clone())
        states.append(mechanic_state(state))
    return torch.stack(trajectory), states


# ----------------------------------------------------------------------------------------------
# Parity with the references


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_optax_variant_matches_optax_mechanize_step_by_step(optax, base, dtype):
    import jax
    import jax.numpy as jnp

    a, x0, noise = noisy_quadratic(seed=0, noise=2.0)
    ours = chain(*([scale_by_adam()] if base == "adam" else []), scale_by_learning_rate(1.0),
                 mechanic_scale())
    theirs = optax.contrib.mechanize(optax.adam(1.0) if base == "adam" else optax.sgd(1.0))
    theirs_update = jax.jit(theirs.update)
    params = [torch.tensor(x0.astype(dtype))]
    state, ref = ours.init(params), jnp.asarray(x0.astype(dtype))
    ref_state = theirs.init(ref)
    tolerance = 1e-11 if dtype == np.float64 else 2e-5
    negative_rewards = 0
    for t in range(60):  # the same gradient sequence for both, from our iterate
        g = (a @ params[0].numpy().astype(np.float64) + noise[t]).astype(dtype)
        out, state = ours.update([torch.tensor(g)], state, params)
        apply_updates(params, out)
        step, ref_state = theirs_update(jnp.asarray(g), ref_state, ref)
        ref = optax.apply_updates(ref, step)
        for mine, theirs_ in [(params[0], ref), (state[-1].s, ref_state.s),
                              (state[-1].r, ref_state.r)]:
            expected = np.asarray(theirs_)
            np.testing.assert_allclose(mine.numpy(), expected, rtol=0,
                                       atol=tolerance * np.abs(expected).max(),
                                       err_msg=f"step {t}")
        negative_rewards += bool((np.asarray(ref_state.r) < 0).any())
        assert params[0].dtype == torch.from_numpy(np.zeros(1, dtype)).dtype
    assert negative_rewards > 0  # the reward clipping path was exercised
    assert float(np.asarray(ref_state.s).sum()) > 1000 * 1e-6  # the reference scale moved


@pytest.mark.parametrize("store_delta", [False, True])
def test_pytorch_variant_matches_mechanic_pytorch_through_a_chain(store_delta):
    mechanic_pytorch = pytest.importorskip("mechanic_pytorch")
    a, x0, noise = noisy_quadratic(seed=0, noise=2.0)
    a, x0, noise = (torch.tensor(v, dtype=torch.float32) for v in (a, x0, noise))
    lrs = (1.0, 0.3)  # two param groups with their own learning rates, one Mechanic scale
    ref_params = [torch.nn.Parameter(x0[:4].reshape(2, 2).clone()),
                  torch.nn.Parameter(x0[4:].clone())]
    ref = mechanic_pytorch.mechanize(torch.optim.SGD, store_delta=store_delta)(
        [{"params": [ref_params[0]], "lr": lrs[0]}, {"params": [ref_params[1]], "lr": lrs[1]}])
    ours = chain(partition({"a": scale_by_learning_rate(lrs[0]),
                            "b": scale_by_learning_rate(lrs[1])}, ["a", "b"]),
                 mechanic_scale(variant="pytorch", store_delta=store_delta))
    params = [p.detach().clone() for p in ref_params]
    state = ours.init(params)
    for t in range(60):
        g = a @ torch.cat([p.detach().reshape(-1) for p in ref_params]) + noise[t]
        grads = [g[:4].reshape(2, 2), g[4:]]
        for p, gi in zip(ref_params, grads):
            p.grad = gi.clone()
        ref.step()
        out, state = ours.update([gi.clone() for gi in grads], state, params)
        apply_updates(params, out)
        expected = torch.cat([p.detach().reshape(-1) for p in ref_params])
        got = torch.cat([p.reshape(-1) for p in params])
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * expected.abs().max().item(),
                                   msg=f"step {t}")
        torch.testing.assert_close(state[-1].s.sum(), ref.state["_mechanic"]["s"].sum(),
                                   rtol=1e-4, atol=0)
    assert state[-1].s.sum() > 1000 * 1e-8  # the scale moved from s_init


# ----------------------------------------------------------------------------------------------
# Closed forms (§6.6, §11.22-23)


def test_optax_first_output_is_s_init_times_u_and_the_scale_moves_from_step_three():
    tx = chain(scale_by_learning_rate(1.0), mechanic_scale(s_init=1e-6))
    a, x0, _ = noisy_quadratic()
    trajectory, states = run_chain(tx, x0, lambda x, t: a @ x, 4)
    g1 = a @ x0
    torch.testing.assert_close(trajectory[0] - torch.tensor(x0), torch.tensor(-1e-6 * g1),
                               rtol=1e-9, atol=0)
    scales = [mechanic_scale_value(s) for s in states]
    assert scales[0] == pytest.approx(1e-6, rel=1e-14)
    assert scales[1] == pytest.approx(1e-6, rel=1e-3)  # |h_c| <= m = eps keeps r ~ 0
    assert abs(scales[2] - 1e-6) > 1e-3 * 1e-6


def test_pytorch_first_scale_closed_form():
    tx = chain(scale_by_learning_rate(1.0), mechanic_scale(variant="pytorch"))
    params = [torch.randn(5)]
    x0 = params[0].clone()
    g = torch.randn(5)
    out, state = tx.update([g], tx.init(params), params)
    expected = 1e-6 * sum(DEFAULT_BETAS) / len(DEFAULT_BETAS) * 1e-8 / 1e-8
    assert expected == pytest.approx(9.814815e-7, rel=1e-6)
    assert mechanic_scale_value(state) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(x0 + out[0], x0 - expected * g, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Invariants (§6.9, §11.25)


@pytest.mark.parametrize("variant", ["optax", "pytorch"])
def test_invariants_hold_at_every_step(variant):
    a, x0, noise = noisy_quadratic(seed=2)
    tx = chain(trace(0.9), scale_by_learning_rate(1.0),
               mechanic_scale(variant=variant, store_delta=True))
    trajectory, states = run_chain(tx, x0, lambda x, t: a @ x + noise[t], 60, split=[4, 2])
    eps = 1e-8
    for x, state in zip(trajectory, states):
        assert (state.s >= 0).all()
        if variant == "pytorch":
            assert (state.r >= 0).all()
        else:  # optax keeps r unclipped (only its wealth is clipped) and m >= eps
            assert (state.m >= eps).all()
        flat = torch.cat([(xr + state.s.sum() * d).reshape(-1)
                          for xr, d in zip(state.x_ref, state.delta)])
        torch.testing.assert_close(x, flat, rtol=1e-12, atol=1e-14)
    if variant == "optax":
        assert any((state.r < 0).any() for state in states)  # r < 0 does happen


def test_base_lr_times_c_and_s_init_over_c_give_the_same_trajectory_only_without_decay():
    # §11.24: with lambda = 0 (and eps ~ 0) Mechanic is invariant to (lr, s_init) -> (c lr,
    # s_init / c); its weight-decay term is not, since it does not scale with the step.
    a, x0, noise = noisy_quadratic(noise=1.0)
    grad_fn = lambda x, t: a @ x + noise[t]  # noqa: E731

    def trajectory(lr, s_init, s_decay):
        tx = chain(scale_by_adam(), scale_by_learning_rate(lr),
                   mechanic_scale(s_decay=s_decay, s_init=s_init, eps=1e-30))
        return run_chain(tx, x0, grad_fn, 30)[0]

    for s_decay, agrees in [(0.0, True), (0.01, False)]:
        one, scaled = trajectory(1.0, 1e-6, s_decay), trajectory(1000.0, 1e-9, s_decay)
        difference = (one - scaled).abs().max().item()
        assert (difference < 1e-12) == agrees, (s_decay, difference)
        assert (one[-1] - torch.tensor(x0)).abs().max() > 1e-2  # it moved


@pytest.mark.parametrize("variant", ["optax", "pytorch"])
def test_store_delta_agrees_with_the_recovered_delta_as_eps_vanishes(variant):
    a, x0, noise = noisy_quadratic(noise=1.0)
    grad_fn = lambda x, t: a @ x + noise[t]  # noqa: E731
    # the pytorch variant's first scale is 1e-6 mean(beta) s_init / eps: keep s_init / eps
    tiny = dict(eps=1e-30, s_init=1e-6 if variant == "optax" else 1e-30)

    def difference(**options):
        runs = [run_chain(chain(scale_by_learning_rate(1.0),
                                mechanic_scale(variant=variant, store_delta=store, **options)),
                          x0, grad_fn, 30)[0] for store in (False, True)]
        return (runs[0] - runs[1]).abs().max().item()

    assert difference(**tiny) < 1e-12
    assert difference() > 1e-6  # with eps = 1e-8 the recovered delta is shrunk by S/(S+eps)


# ----------------------------------------------------------------------------------------------
# State, dtypes, memory


def test_x_ref_is_taken_at_the_first_update_not_at_init():
    tx = chain(scale_by_learning_rate(1.0), mechanic_scale())
    params = [torch.zeros(3)]
    state = tx.init(params)
    params[0].copy_(torch.tensor([1.0, 2.0, 3.0]))  # e.g. weights loaded after init
    _, state = tx.update([torch.ones(3)], state, params)
    assert torch.equal(state[-1].x_ref[0], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("dtypes, expected", [
    ((torch.bfloat16, torch.bfloat16), torch.float32),
    ((torch.float32, torch.float32), torch.float32),
    ((torch.float32, torch.float64), torch.float64),
])
@pytest.mark.parametrize("variant", ["optax", "pytorch"])
def test_scalar_state_is_float32_or_float64_whatever_the_parameters(dtypes, expected, variant):
    tx = chain(scale_by_learning_rate(1.0), mechanic_scale(variant=variant))
    params = [torch.randn(4, 3).to(dtypes[0]), torch.randn(5).to(dtypes[1])]
    state = tx.init(params)
    for _ in range(3):
        out, state = tx.update([torch.randn(4, 3).to(dtypes[0]), torch.randn(5).to(dtypes[1])],
                               state, params)
        apply_updates(params, out)
    mech = state[-1]
    assert {t.dtype for t in (mech.s, mech.m, mech.v, mech.r)} == {expected}
    if dtypes[0] == torch.bfloat16:
        assert mech.x_ref[0].dtype == torch.float32 and out[0].dtype == torch.float32
        assert params[0].dtype == torch.bfloat16
    assert mechanic_scale_value(state) > 0


@pytest.mark.parametrize("store_delta, buffers", [(False, 1), (True, 2)])
def test_one_parameter_sized_buffer_by_default_two_with_store_delta(store_delta, buffers):
    params = [torch.randn(4, 3), torch.randn(5)]
    tx = mechanic_scale(store_delta=store_delta)
    state = tx.init(params)
    _, state = tx.update([torch.randn(4, 3), torch.randn(5)], state, params,
                         grads=[torch.randn(4, 3), torch.randn(5)])
    sized = [t for field in state if isinstance(field, list) for t in field]
    assert sum(t.numel() for t in sized) == buffers * sum(p.numel() for p in params)
    assert state.delta is None if not store_delta else len(state.delta) == 2
    assert state.s.shape == state.m.shape == state.v.shape == state.r.shape == (6,)


def test_mechanic_must_be_the_last_member_of_a_chain():
    assert mechanic_scale().terminal
    with pytest.raises(ValueError, match="terminal"):
        chain(scale_by_learning_rate(1.0), mechanic_scale(), scale(2.0))


# ----------------------------------------------------------------------------------------------
# Validation and missing inputs


@pytest.mark.parametrize("options, message", [
    (dict(s_init=0.0), "s_init must be > 0"),
    (dict(s_init=-1e-8), "s_init must be > 0"),
    (dict(betas=()), "betas is empty"),
    (dict(betas=(0.9, 1.0)), r"betas must be a number in \(0, 1\)"),
    (dict(betas=(0.0,)), r"betas must be a number in \(0, 1\)"),
    (dict(betas=0.9), "betas must be a sequence"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1.0, variant="pytorch"), "eps must be > 0"),
    (dict(s_decay=-0.01), "s_decay must be >= 0"),
    (dict(s_decay=math.nan), "s_decay must be a number"),
    (dict(variant="jax"), "variant must be one of"),
    (dict(store_delta="yes"), "store_delta must be True or False"),
    (dict(s_decay=lambda count: 0.01), "needs a constant s_decay"),
])
def test_invalid_options_raise_a_message_that_names_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        mechanic_scale(**options)


def test_missing_params_or_grads_raise_and_say_how_to_provide_them():
    tx = mechanic_scale()
    params = [torch.zeros(2)]
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update([torch.ones(2)], state, grads=[torch.ones(2)])
    with pytest.raises(ValueError, match="'grads' extra.*chain"):
        tx.update([torch.ones(2)], state, params)
    with pytest.raises(ValueError, match="sparse"):
        tx.update([torch.ones(2)], state, params, grads=[torch.ones(2).to_sparse()])
