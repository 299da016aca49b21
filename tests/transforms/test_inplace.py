"""HeavyBall's in-place pieces (ALGORITHMS.md §8.5.1, §9.2, §4, §11 items 14, 15, 29, 30):
reference loops with Adam-style bias corrections, closed forms, optax parity for ADOPT's paper
style, palm_beta2 composition, ownership, dtypes, validation."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from gradchain.chains import chain
from gradchain.core import apply_updates, debiased_decay
from gradchain.transforms import inplace, scale_by_learning_rate
from gradchain.transforms.inplace import (scale_by_adam_inplace, scale_by_adopt, scale_by_laprop,
                                          scale_by_rms_inplace)
from gradchain.transforms.palm import palm_beta2

F64 = torch.float64

# name -> factory taking the second-moment decay (the others at fixed non-default values)
FACTORIES = {
    "adam_inplace": lambda b2: scale_by_adam_inplace(b1=0.8, b2=b2, eps=1e-6),
    "rms_inplace": lambda b2: scale_by_rms_inplace(b2=b2, eps=1e-6),
    "laprop": lambda b2: scale_by_laprop(b1=0.8, b2=b2, eps=1e-6),
    "adopt": lambda b2: scale_by_adopt(b1=0.8, b2=b2, eps=1e-6),
    "adopt_clip": lambda b2: scale_by_adopt(b1=0.8, b2=b2, eps=1e-6, clip=True),
    "adopt_paper": lambda b2: scale_by_adopt(b1=0.8, b2=b2, eps=1e-6, style="paper"),
}
NAMES = {"adam_inplace": "scale_by_adam_inplace", "rms_inplace": "scale_by_rms_inplace",
         "laprop": "scale_by_laprop", "adopt": "scale_by_adopt", "adopt_clip": "scale_by_adopt",
         "adopt_paper": "scale_by_adopt"}
BETAS = [(0.9, 0.99), (0.5, 0.999), (0.0, 0.9), (0.95, 0.3)]


def run(tx, grads_per_step, params=None):
    """Outputs (cloned) of successive updates and the final state."""
    state = tx.init(params if params is not None else
                    [torch.zeros_like(g) for g in grads_per_step[0]])
    outs = []
    for grads in grads_per_step:
        out, state = tx.update([g.clone() for g in grads], state, params)
        outs.append([o.clone() for o in out])
    return outs, state


def gradient_steps(trees, steps: int = 20, seed: int = 0, zeros: bool = True):
    gen = torch.Generator().manual_seed(seed)
    return [trees.random_tree(gen, zeros=zeros) for _ in range(steps)]


def close(a, b, rtol=1e-12, atol=1e-300):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# In-place debiasing = Adam's bias correction (§9.2, §11.30): reference loops with biased
# moments divided by 1 - beta^t, independent of core.debiased_decay


@pytest.mark.parametrize("b1, b2", BETAS)
def test_adam_inplace_is_adams_bias_corrected_moment_over_floored_root(b1, b2, trees):
    eps = 1e-8
    grads = gradient_steps(trees)
    outs, state = run(scale_by_adam_inplace(b1, b2, eps), grads)
    m = [torch.zeros_like(g) for g in grads[0]]
    v = [torch.zeros_like(g) for g in grads[0]]
    for t, (u, out) in enumerate(zip(grads, outs), start=1):
        for i, g in enumerate(u):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            close(out[i], m_hat / torch.clamp(v_hat.sqrt(), min=eps), atol=1e-9)
    for i in range(len(m)):  # the state *is* Adam's bias-corrected moments
        close(state.mu[i], m[i] / (1 - b1 ** len(grads)), atol=1e-13)
        close(state.nu[i], v[i] / (1 - b2 ** len(grads)), atol=1e-13)
    assert state.count == len(grads)


@pytest.mark.parametrize("b2", [0.99, 0.5])
def test_rms_inplace_is_u_over_floored_root_of_bias_corrected_second_moment(b2, trees):
    eps = 1e-6
    grads = gradient_steps(trees)
    outs, state = run(scale_by_rms_inplace(b2, eps), grads)
    v = [torch.zeros_like(g) for g in grads[0]]
    for t, (u, out) in enumerate(zip(grads, outs), start=1):
        for i, g in enumerate(u):
            v[i] = b2 * v[i] + (1 - b2) * g * g
            close(out[i], g / torch.clamp((v[i] / (1 - b2 ** t)).sqrt(), min=eps), atol=1e-9)


@pytest.mark.parametrize("b1, b2", BETAS)
def test_laprop_equals_the_papers_bias_corrected_form_without_eps(b1, b2, trees):
    # Ziyin et al.: n_t = nu n + (1 - nu) g^2; m_t = mu m + (1 - mu) g / sqrt(n_t / (1 - nu^t));
    # step m_t / (1 - mu^t). With eps = 0 the placement of eps does not matter.
    grads = gradient_steps(trees, zeros=False)
    outs, _ = run(scale_by_laprop(b1, b2, eps=0.0), grads)
    m = [torch.zeros_like(g) for g in grads[0]]
    n = [torch.zeros_like(g) for g in grads[0]]
    for t, (u, out) in enumerate(zip(grads, outs), start=1):
        for i, g in enumerate(u):
            n[i] = b2 * n[i] + (1 - b2) * g * g
            m[i] = b1 * m[i] + (1 - b1) * g / (n[i] / (1 - b2 ** t)).sqrt()
            close(out[i], m[i] / (1 - b1 ** t), rtol=1e-11, atol=1e-13)


def test_laprop_eps_floors_the_root_where_the_paper_adds_it():
    # one step, u = 1e-3, eps = 1e-2: floor gives u / eps = 0.1, the paper u / (|u| + eps)
    tx = scale_by_laprop(eps=1e-2)
    out, _ = tx.update([torch.tensor([1e-3, 1.0], dtype=F64)], tx.init([torch.zeros(2, dtype=F64)]))
    close(out[0], torch.tensor([0.1, 1.0], dtype=F64), rtol=1e-15)


def _adopt_reference(grads, b1, b2, eps, clip, debias):
    """ADOPT (§8.5.1) with biased moments: heavyball style divides by 1 - beta^k, k the moment's
    own update index (m: t - 1, v: t with v's first update at t = 1)."""
    m = [torch.zeros_like(g) for g in grads[0]]
    v = [g * g for g in grads[0]]  # t = 1: v_1 = u_1^2, output zero, in both styles
    v_biased = [(1 - b2) * g * g for g in grads[0]]  # its biased form, v_1 (1 - b2^1)
    outs = [[torch.zeros_like(g) for g in grads[0]]]
    for t, u in enumerate(grads[1:], start=2):
        out = []
        for i, g in enumerate(u):
            n = g / torch.clamp(v[i].sqrt(), min=eps)
            if clip:
                n = n.clamp(-(t - 1) ** 0.25, (t - 1) ** 0.25)
            m[i] = b1 * m[i] + (1 - b1) * n
            out.append(m[i] / (1 - b1 ** (t - 1)) if debias else m[i].clone())
            if debias:
                v_biased[i] = b2 * v_biased[i] + (1 - b2) * g * g
                v[i] = v_biased[i] / (1 - b2 ** t)
            else:
                v[i] = b2 * v[i] + (1 - b2) * g * g
        outs.append(out)
    return outs


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("b1, b2", BETAS)
def test_heavyball_adopt_matches_the_debiased_reference(b1, b2, clip, trees):
    grads = gradient_steps(trees)
    outs, state = run(scale_by_adopt(b1, b2, eps=1e-6, clip=clip), grads)
    expected = _adopt_reference(grads, b1, b2, 1e-6, clip, debias=True)
    for t, (out, ref) in enumerate(zip(outs, expected), start=1):
        for o, r in zip(out, ref):
            close(o, r, rtol=1e-10, atol=1e-12)
    assert state.count == len(grads)


@pytest.mark.parametrize("clip", [False, True])
def test_paper_adopt_matches_the_plain_reference(clip, trees):
    grads = gradient_steps(trees)
    outs, _ = run(scale_by_adopt(0.9, 0.999, eps=1e-6, clip=clip, style="paper"), grads)
    for out, ref in zip(outs, _adopt_reference(grads, 0.9, 0.999, 1e-6, clip, debias=False)):
        for o, r in zip(out, ref):
            close(o, r, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# ADOPT's paper style = optax.contrib.scale_by_adopt, step by step

ADOPT_OPTAX_CASES = {
    # (ours, optax's) keyword arguments
    "optax_defaults": (dict(b1=0.9, b2=0.9999, eps=1e-6), {}),
    "no_clipping": (dict(b1=0.9, b2=0.9999, eps=1e-6, clip=False), dict(use_clipping=False)),
    "explicit_clipping": (dict(b1=0.5, b2=0.9, eps=1e-3, clip=True),
                          dict(b1=0.5, b2=0.9, eps=1e-3, use_clipping=True)),
    "fast_decays_no_clipping": (dict(b1=0.3, b2=0.6, eps=1e-2, clip=False),
                                dict(b1=0.3, b2=0.6, eps=1e-2, use_clipping=False)),
}


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("case", ADOPT_OPTAX_CASES)
def test_paper_style_adopt_matches_optax(case, kind, optax, assert_matches_optax):
    ours, theirs = ADOPT_OPTAX_CASES[case]
    assert_matches_optax(scale_by_adopt(**ours, style="paper"),
                         optax.contrib.scale_by_adopt(**theirs), kind=kind, steps=25,
                         atol=1e-14)  # m cancels to ~1e-5 in places: lerp rounds differently


# ---------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("make", [scale_by_adam_inplace, scale_by_laprop],
                         ids=["adam_inplace", "laprop"])
def test_first_step_is_the_sign_where_u_exceeds_eps(make):
    u = torch.tensor([2.0, -0.5, 3e-3, -7.0, 1e-9, 0.0], dtype=F64)
    tx = make(eps=1e-8)
    out, _ = tx.update([u.clone()], tx.init([torch.zeros(6, dtype=F64)]))
    assert torch.equal(out[0][:4], torch.sign(u[:4]))
    close(out[0][4:], u[4:] / 1e-8, rtol=1e-15)  # below eps: u / eps


def _trajectory(tx, steps=3):
    """x from 1 under a constant gradient 1 (§11.29)."""
    params = [torch.ones(1, dtype=F64)]
    state = tx.init(params)
    xs = []
    for _ in range(steps):
        u, state = tx.update([torch.ones(1, dtype=F64)], state, params)
        apply_updates(params, u)
        xs.append(params[0].item())
    return xs


@pytest.mark.parametrize("make, expected", [
    (scale_by_laprop, [0.9, 0.8, 0.7]),
    (scale_by_adam_inplace, [0.9, 0.8, 0.7]),
    (scale_by_adopt, [1.0, 0.9, 0.8]),  # the spec's ADOPT: no HeavyBall-0.8 lag (1, 1, 0.9)
], ids=["laprop", "adam_inplace", "adopt"])
def test_constant_gradient_trajectories_from_heavyball(make, expected):
    xs = _trajectory(chain(make(), scale_by_learning_rate(0.1)))
    assert xs == pytest.approx(expected, rel=1e-14)


def test_paper_style_adopt_first_step_is_one_minus_b1_of_the_normalised_update():
    # no debiasing: m_2 = (1 - b1) n_2, so x moves by lr (1 - b1) = 0.01 at the second call
    xs = _trajectory(chain(scale_by_adopt(style="paper"), scale_by_learning_rate(0.1)))
    assert xs == pytest.approx([1.0, 0.99, 0.99 - 0.1 * 0.19], rel=1e-14)


def test_adopt_first_output_is_exactly_zero_and_v_is_u_squared():
    u = torch.tensor([3.0, -2.0, 0.0, 1e-30])
    for style in ("heavyball", "paper"):
        tx = scale_by_adopt(eps=0.0, style=style)
        out, state = tx.update([u.clone()], tx.init([torch.zeros(4)]))
        assert torch.equal(out[0], torch.zeros(4)) and not out[0].signbit().any()
        assert torch.equal(state.nu[0], u * u) and torch.equal(state.mu[0], torch.zeros(4))


def test_adopt_normalises_by_the_previous_second_moment():
    # u_2 = 10 u_1: ADOPT divides by |u_1| (-> 10), Adam-like transforms by the updated moment
    tx = scale_by_adopt(eps=0.0)
    state = tx.init([torch.zeros(2, dtype=F64)])
    _, state = tx.update([torch.tensor([1.0, -2.0], dtype=F64)], state)
    out, state = tx.update([torch.tensor([10.0, -20.0], dtype=F64)], state)
    close(out[0], torch.tensor([10.0, -10.0], dtype=F64), rtol=1e-15)
    # then v <- beta-hat_2(2) v + (1 - beta-hat_2(2)) u^2 with beta-hat_2(2) = 0.99 / 1.99
    w = 0.99 / 1.99
    close(state.nu[0], torch.tensor([w + (1 - w) * 100, 4 * (w + (1 - w) * 100)], dtype=F64),
          rtol=1e-14)


def test_adopt_clip_bounds_the_normalised_update_by_the_fourth_root_of_t_minus_one():
    tx = scale_by_adopt(b1=0.0, b2=0.0, eps=0.0, clip=True)  # m = n, v = last u^2
    state = tx.init([torch.zeros(2, dtype=F64)])
    out, state = tx.update([torch.tensor([1e-3, 1.0], dtype=F64)], state)
    limits = []
    for t in range(2, 6):
        out, state = tx.update([torch.tensor([1.0, -1e6], dtype=F64)], state)
        limits.append(out[0].tolist())
        state = state._replace(nu=[torch.tensor([1e-6, 1e-6], dtype=F64)])
    expected = [[(t - 1) ** 0.25, -((t - 1) ** 0.25)] for t in range(2, 6)]
    assert limits[0] == [1.0, -1.0]
    for got, want in zip(limits, expected):
        assert got == pytest.approx(want, rel=1e-15)


def test_adopt_paper_style_reads_the_b1_schedule_at_the_momentum_update_index():
    # b1(0) = 0 for the first momentum update (t = 2), b1(1) = 0.25 for the second (t = 3)
    tx = scale_by_adopt(b1=lambda k: 0.25 * k, b2=0.0, eps=0.0, style="paper", clip=False)
    state = tx.init([torch.zeros(1, dtype=F64)])
    outs = []
    for g in [1.0, 2.0, 6.0]:  # n_2 = 2 / 1, n_3 = 6 / 2
        out, state = tx.update([torch.tensor([g], dtype=F64)], state)
        outs.append(out[0].item())
    assert outs == [0.0, 2.0, 0.25 * 2.0 + 0.75 * 3.0]


def test_rms_inplace_two_step_closed_form():
    # beta-hat(2) = b (1 - b) / (1 - b^2) = b / (1 + b) = 1/3 for b = 1/2: v2 = (u1^2 + 2 u2^2)/3
    tx = scale_by_rms_inplace(b2=0.5, eps=1e-3)
    state = tx.init([torch.zeros(3, dtype=F64)])
    out1, state = tx.update([torch.tensor([2.0, 0.0, 1e-4], dtype=F64)], state)
    close(out1[0], torch.tensor([1.0, 0.0, 0.1], dtype=F64), rtol=1e-15)
    out2, state = tx.update([torch.tensor([1.0, 3.0, 0.0], dtype=F64)], state)
    v2 = torch.tensor([2.0, 6.0, 1e-8 / 3], dtype=F64)
    close(state.nu[0], v2, rtol=1e-15)
    close(out2[0], torch.tensor([1 / math.sqrt(2.0), 3 / math.sqrt(6.0), 0.0], dtype=F64),
          rtol=1e-15)


@pytest.mark.parametrize("case", ["adam_inplace", "rms_inplace", "laprop"])
def test_constant_gradient_gives_a_constant_normalised_output(case):
    g = torch.tensor([4.0, -0.25, 1e-3], dtype=F64)
    tx = FACTORIES[case](0.999)
    state = tx.init([torch.zeros(3, dtype=F64)])
    for _ in range(10):
        out, state = tx.update([g.clone()], state)
        close(out[0], g / torch.clamp(g.abs(), min=1e-6), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# palm_beta2 (§4): as b2, as a preceding chain member, mean and constant identities, HeavyBall's
# debiased values


@pytest.mark.parametrize("case", FACTORIES)
def test_palm_beta2_as_b2_equals_palm_beta2_as_a_preceding_chain_member(case, trees):
    grads = gradient_steps(trees, steps=12)
    for schedule in (palm_beta2(), palm_beta2(0.5, heavyball_debias=True)):
        as_b2, _ = run(chain(FACTORIES[case](schedule)), grads)
        as_member, _ = run(chain(schedule, FACTORIES[case](0.5)), grads)
        as_constant, _ = run(chain(FACTORIES[case](0.5)), grads)
        for k, (a, b) in enumerate(zip(as_b2, as_member)):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{case}, step {k}"
        assert any(not torch.equal(x, y) for x, y in zip(as_b2[-1], as_constant[-1]))


@pytest.mark.parametrize("case", FACTORIES)
def test_palm_beta2_scale_one_makes_the_second_moment_the_arithmetic_mean(case, trees):
    grads = gradient_steps(trees, steps=15)
    tx = FACTORIES[case](palm_beta2(1.0))
    state = tx.init([torch.zeros_like(g) for g in grads[0]])
    for k, u in enumerate(grads, start=1):
        _, state = tx.update([g.clone() for g in u], state)
        for i, nu in enumerate(state.nu):
            mean = sum(step[i] ** 2 for step in grads[:k]) / k
            close(nu, mean, rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("case", FACTORIES)
def test_constant_squared_updates_give_exactly_that_second_moment_with_palm(case):
    tx = FACTORIES[case](palm_beta2())
    g = torch.tensor([3.0, -0.5, 1e-4], dtype=F64)
    state = tx.init([torch.zeros(3, dtype=F64)])
    for k in range(12):  # alternating signs, constant squares
        _, state = tx.update([g * (-1) ** k], state)
        close(state.nu[0], g * g, rtol=1e-15, atol=0.0)


HEAVYBALL_DEBIASED = {2: 0.2985660, 10: 0.8071737, 100: 0.9727397, 1000: 0.9959438}
PALM_RAW = {2: 0.4256508, 10: 0.8415107, 100: 0.9748811, 1000: 0.9960189}


@pytest.mark.parametrize("k", HEAVYBALL_DEBIASED)
def test_heavyball_debiased_palm_decays(k):
    got = debiased_decay(palm_beta2(heavyball_debias=True), k - 1)
    assert got == pytest.approx(HEAVYBALL_DEBIASED[k], abs=5e-8)
    assert debiased_decay(palm_beta2(), k - 1) == pytest.approx(PALM_RAW[k], abs=5e-8)


@pytest.mark.parametrize("debias", [True, False], ids=["heavyball_debias", "raw"])
@pytest.mark.parametrize("case", ["adam_inplace", "rms_inplace", "laprop", "adopt"])
def test_transforms_use_the_palm_decay_of_their_update_index(case, debias):
    # u = 1 for k - 1 updates (v-hat = 1), then u = 0: v-hat_k = beta(k) exactly
    table = HEAVYBALL_DEBIASED if debias else PALM_RAW
    tx = FACTORIES[case](palm_beta2(heavyball_debias=debias))
    params = [torch.zeros(1, dtype=F64)]
    state = tx.init(params)
    one, zero = [torch.ones(1, dtype=F64)], [torch.zeros(1, dtype=F64)]
    for k in range(1, max(table) + 1):
        _, state = tx.update(zero if k in table else one, state)
        if k in table:
            assert state.nu[0].item() == pytest.approx(table[k], abs=5e-8), k
            state = state._replace(nu=[torch.ones(1, dtype=F64)])


# ---------------------------------------------------------------------------------------------
# Contracts: ownership, empty trees, dtypes, flags


@pytest.mark.parametrize("case", FACTORIES)
def test_outputs_do_not_alias_the_state(case, trees):
    grads = gradient_steps(trees, steps=4)
    reference, ref_state = run(FACTORIES[case](0.9), grads)
    tx = FACTORIES[case](0.9)
    state = tx.init([torch.zeros_like(g) for g in grads[0]])
    for k, u in enumerate(grads):
        out, state = tx.update([g.clone() for g in u], state)
        assert all(torch.equal(o, r) for o, r in zip(out, reference[k])), f"step {k}"
        before = [t.clone() for t in state.mu + state.nu] if hasattr(state, "mu") else \
            [t.clone() for t in state.nu]
        for o in out:
            o.fill_(float("nan"))
        after = state.mu + state.nu if hasattr(state, "mu") else state.nu
        assert all(torch.equal(a, b) for a, b in zip(after, before)), f"step {k}"


@pytest.mark.parametrize("in_chain", [False, True], ids=["grads_extra", "chain"])
@pytest.mark.parametrize("case", FACTORIES)
def test_the_raw_gradient_is_not_overwritten(case, in_chain, trees):
    grads = gradient_steps(trees, steps=3)
    tx = chain(FACTORIES[case](0.9)) if in_chain else FACTORIES[case](0.9)
    state = tx.init([torch.zeros_like(g) for g in grads[0]])
    for u in grads:
        before = [g.clone() for g in u]
        _, state = tx.update(u, state) if in_chain else tx.update(u, state, grads=u)
        assert all(torch.equal(a, b) for a, b in zip(u, before))


@pytest.mark.parametrize("case", FACTORIES)
def test_results_do_not_depend_on_whether_the_input_may_be_reused(case):
    # an update that is not the raw gradient may be reused as a buffer; the result is the same
    # as when it must be copied (no grads extra)
    u = [torch.tensor([1.0, -2.0, 0.5], dtype=F64)]
    raw = [torch.zeros(3, dtype=F64)]
    tx = FACTORIES[case](0.9)
    state_a = tx.init(raw)
    state_b = tx.init(raw)
    for _ in range(3):
        a, state_a = tx.update([u[0].clone()], state_a, grads=raw)
        b, state_b = tx.update([u[0].clone()], state_b)
        assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("empty", [[], {}], ids=["list", "dict"])
@pytest.mark.parametrize("case", FACTORIES)
def test_empty_tree_advances_count(case, empty):
    tx = FACTORIES[case](0.9)
    state = tx.init(type(empty)())
    for k in range(2):
        out, state = tx.update(type(empty)(), state)
        assert type(out) is type(empty) and len(out) == 0 and state.count == k + 1


@pytest.mark.parametrize("case", FACTORIES)
def test_bf16_params_keep_float32_state_and_float32_updates(case):
    params = [torch.randn(3, 2).to(torch.bfloat16), torch.randn(4).to(torch.bfloat16)]
    tx = chain(FACTORIES[case](0.9))
    state = tx.init(params)
    moments = [t for s in state for t in (s.mu + s.nu if hasattr(s, "mu") else s.nu)]
    assert len(moments) >= 2 and all(t.dtype == torch.float32 for t in moments)
    for _ in range(3):
        grads = [torch.randn(p.shape).to(torch.bfloat16) for p in params]
        out, state = tx.update(grads, state, params)
        assert all(o.dtype == torch.float32 and bool(o.isfinite().all()) for o in out)
    assert all(t.dtype == torch.float32 for s in state for t in s.nu)


@pytest.mark.parametrize("case", FACTORIES)
def test_dict_trees_come_back_as_dicts_with_the_list_results(case, trees):
    grads = gradient_steps(trees, steps=3)
    as_list, _ = run(FACTORIES[case](0.9), grads)
    tx = FACTORIES[case](0.9)
    state = tx.init(trees.as_kind([torch.zeros_like(g) for g in grads[0]], "dict"))
    for k, u in enumerate(grads):
        out, state = tx.update(trees.as_kind([g.clone() for g in u], "dict"), state)
        assert list(out) == list(trees.SHAPES)
        assert all(torch.equal(a, b) for a, b in zip(out.values(), as_list[k]))


@pytest.mark.parametrize("case", FACTORIES)
def test_sparse_and_complex_updates_are_rejected_naming_the_transform(case):
    tx = FACTORIES[case](0.9)
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.5, -2.0]), (3,),
                                     check_invariants=True)
    with pytest.raises(ValueError, match=rf"{NAMES[case]} does not support sparse"):
        tx.update([sparse], tx.init([torch.ones(3)]))
    cplx = torch.tensor([1 + 2j, 0j], dtype=torch.complex64)
    with pytest.raises(ValueError, match=rf"{NAMES[case]} does not support complex"):
        tx.update([cplx], tx.init([torch.ones(2, dtype=torch.complex64)]))


@pytest.mark.parametrize("case", FACTORIES)
def test_flags_are_leafwise_and_elementwise(case):
    tx = FACTORIES[case](0.9)
    assert tx.leafwise and tx.elementwise and not tx.terminal


@pytest.mark.parametrize("case", FACTORIES)
def test_whole_list_update_equals_per_tensor_updates_bitwise(case, trees):
    grads = gradient_steps(trees, steps=4)
    together, _ = run(FACTORIES[case](0.9), grads)
    for i in range(len(grads[0])):
        alone, _ = run(FACTORIES[case](0.9), [[u[i]] for u in grads])
        assert all(torch.equal(together[k][i], alone[k][0]) for k in range(len(grads)))


# ---------------------------------------------------------------------------------------------
# Validation

MAKERS = {"scale_by_adam_inplace": scale_by_adam_inplace, "scale_by_laprop": scale_by_laprop,
          "scale_by_adopt": scale_by_adopt}


@pytest.mark.parametrize("maker", MAKERS)
@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=-0.1), "b1"), (dict(b1=1.0), "b1"), (dict(b1=float("nan")), "b1"),
    (dict(b1="0.9"), "b1"), (dict(b2=1.0), "b2"), (dict(b2=-0.5), "b2"),
    (dict(b2=None), "b2"), (dict(eps=-1e-8), "eps"), (dict(eps=float("nan")), "eps"),
])
def test_moment_transforms_reject_invalid_hyperparameters(maker, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        MAKERS[maker](**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(b2=1.0), "b2"), (dict(b2=float("nan")), "b2"), (dict(eps=-1.0), "eps"),
])
def test_rms_inplace_rejects_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        scale_by_rms_inplace(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(style="optax"), "style"), (dict(style=None), "style"), (dict(clip=1), "clip"),
    (dict(clip="yes"), "clip"),
])
def test_adopt_rejects_invalid_style_and_clip(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        scale_by_adopt(**kwargs)


@pytest.mark.parametrize("case", FACTORIES)
def test_the_compile_path_gives_bitwise_the_eager_result(monkeypatch, case, trees):
    """Under ``torch.compile`` the lerps run one tensor at a time with a hoisted 0-d weight (so
    that inductor fuses them); run eagerly, that path equals the foreach one bit for bit."""
    grads = gradient_steps(trees, steps=6, seed=11)
    eager = run(FACTORIES[case](0.95), grads)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_path = run(FACTORIES[case](0.95), grads)
    for a, b in zip(eager[0], compiled_path[0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for a, b in zip(eager[1][1:], compiled_path[1][1:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_inplace_docstring_examples_run():
    result = doctest.testmod(inplace)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("make", [scale_by_laprop, scale_by_adopt], ids=["laprop", "adopt"])
def test_a_lent_moment_is_copied_before_a_later_member_writes_into_it(make):
    """Given a ``borrowed`` extra the output is the moment buffer itself; a member after it that
    writes (here a scale) copies first, so outputs and state equal those without lending."""
    from gradchain.transforms import scale
    tx = chain(make(), scale(2.0), scale_by_learning_rate(0.5))
    params = [torch.zeros(4, dtype=torch.float64)]
    lent, kept = tx.init(params), tx.init(params)
    for step in range(4):
        g = [torch.linspace(-1.0, 2.0, 4, dtype=torch.float64) * (step + 1)]
        expected, kept = tx.update(g, kept, params)
        borrowed: set[int] = set()
        out, lent = tx.update(g, lent, params, borrowed=borrowed)
        assert borrowed == {id(lent[0].mu[0])} or step == 0
        torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(lent[0].mu[0], kept[0].mu[0], rtol=0, atol=0)
