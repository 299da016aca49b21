"""soap_precondition (ALGORITHMS.md §5; §11 items 16-21): a direct reference, closed forms,
invariances, the refresh schedule, the axis plan, numerical fallbacks, state and validation."""

from __future__ import annotations

import doctest
import math
import warnings

import pytest
import torch

from gradchain.chains import chain
from gradchain.core import add_scaled_, flatten_state, unflatten_state
from gradchain.schedules import precond_schedule
from gradchain.transforms import palm, scale_by_adam, soap
from gradchain.transforms.soap import merged_shape, refresh_due, soap_precondition

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gradients(shape, steps, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64).to(dtype) for _ in range(steps)]


def orthogonal(n, seed):
    return torch.linalg.qr(randn(n, n, seed=seed)).Q


def run(tx, grads_per_step, params):
    """Outputs of every call and the final state; every call gets fresh copies."""
    state = tx.init(params)
    outs = []
    for grads in grads_per_step:
        out, state = tx.update([g.clone() for g in grads], state, params)
        outs.append(out)
    return outs, state


def run_leaf(tx, grads, dtype=F64):
    """``run`` for a single leaf: its outputs and the final state."""
    outs, state = run(tx, [[g] for g in grads], [torch.zeros(grads[0].shape, dtype=dtype)])
    return [o[0] for o in outs], state


# ---------------------------------------------------------------------------------------------
# A direct reference: ALGORITHMS.md §5.6-5.7 with m in the original coordinates


def mode_product(x, matrix, axis):
    """X ×_a M: axis a of x contracted with M's first index, the result kept at axis a."""
    return torch.movedim(torch.tensordot(x, matrix, dims=([axis], [0])), -1, axis)


def gram(x, axis):
    return torch.tensordot(x, x, dims=([a for a in range(x.dim()) if a != axis],) * 2)


def reference_soap(grads, b1=0.9, b2=0.95, eps=1e-8, shampoo_beta=None, frequency=2,
                   debias="inplace", eps_mode="max"):
    """SOAP on a tensor whose every axis is preconditioned, from the spec's equations; a
    callable ``frequency`` is an interval f(k), refreshing when sum 1/f(j) crosses an integer."""
    axes = range(grads[0].dim())
    accumulator = 0.0
    grams = [gram(grads[0], a) for a in axes]
    bases = [torch.linalg.eigh(L).eigenvectors.flip(-1) for L in grams]
    m, v = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])

    def project(x, back=False):
        for a in axes:
            x = mode_product(x, bases[a].T if back else bases[a], a)
        return x

    outs = [torch.zeros_like(grads[0])]
    for k, g in enumerate(grads[1:], start=1):
        if debias == "inplace":
            beta1, beta2 = 1 - (1 - b1) / (1 - b1 ** k), 1 - (1 - b2) / (1 - b2 ** k)
            scale = 1.0
        else:
            beta1, beta2 = b1, b2
            scale = math.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        rotated = project(g)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * rotated ** 2
        den = v.sqrt().clamp_min(eps) if eps_mode == "max" else v.sqrt() + eps
        outs.append(scale * project(project(m) / den, back=True))
        decay = beta2 if shampoo_beta is None else shampoo_beta
        grams = [decay * L + (1 - decay) * gram(g, a) for a, L in zip(axes, grams)]
        if callable(frequency):
            due = math.floor(accumulator + 1 / frequency(k)) > math.floor(accumulator)
            accumulator += 1 / frequency(k)
        else:
            due = k % frequency == 0
        if due:
            for a in axes:
                order = torch.argsort(torch.diag(bases[a].T @ grams[a] @ bases[a]),
                                      descending=True)
                v = v.index_select(a, order)
                bases[a] = torch.linalg.qr(grams[a] @ bases[a][:, order]).Q
    return outs


def inplace_adam(grads, b1=0.9, b2=0.95, eps=1e-8):
    """HeavyBall's in-place debiased Adam after SOAP's initialisation-only first call."""
    m, v = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    outs = [torch.zeros_like(grads[0])]
    for k, g in enumerate(grads[1:], start=1):
        beta1, beta2 = 1 - (1 - b1) / (1 - b1 ** k), 1 - (1 - b2) / (1 - b2 ** k)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        outs.append(m / v.sqrt().clamp_min(eps))
    return outs


def crossing_interval(k):
    """Refresh intervals below and above 2, so that m changes basis both ways: every update
    for k <= 3 and 8 <= k <= 9, every third for 4 <= k <= 7, every other after."""
    return 1.0 if k <= 3 or 8 <= k <= 9 else 3.0 if k <= 7 else 2.0


REFERENCE_CASES = {
    "defaults": dict(),
    "interval_crossing_two": dict(frequency=crossing_interval),
    "frequency_3": dict(frequency=3, b1=0.8, b2=0.99),
    "every_step_shampoo_beta": dict(frequency=1, shampoo_beta=0.7),
    "adam_debias_add_eps": dict(debias="adam", eps_mode="add", eps=1e-3),
    "adam_debias_max_eps": dict(debias="adam", eps=1e-3, b1=0.5),
}


def as_soap_kwargs(case):
    kwargs = dict(case)
    kwargs["precondition_frequency"] = kwargs.pop("frequency", 2)
    return kwargs


@pytest.mark.parametrize("shape, options", [
    ((4, 4), {}),
    ((3, 4, 5), dict(merge_dims=False)),   # every axis rotated, the tensordot path
    ((4, 2, 2), {}),                       # merged to (4, 4), rotated on both
    ((300, 300), {}),                      # Grams accumulated blockwise, mirrored at refreshes
], ids=["matrix", "rank3", "merged", "blocked"])
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_the_direct_reference(shape, options, case):
    grads = gradients(shape, 12, seed=1)
    view = merged_shape(shape, 2048) if options.get("merge_dims", True) else shape
    expected = reference_soap([g.reshape(view) for g in grads], **REFERENCE_CASES[case])
    outs, _ = run_leaf(soap_precondition(**as_soap_kwargs(REFERENCE_CASES[case]), **options),
                       grads)
    # a 300 x 300 gradient's Grams have close small eigenvalues: eigh's rounding moves their
    # eigenvectors (and the Adam coordinates divided by the smallest second moments) by ~1e-6
    tolerance = dict(rtol=1e-5, atol=1e-8) if shape == (300, 300) else dict(rtol=1e-9, atol=1e-11)
    for k, (o, e) in enumerate(zip(outs, expected)):
        assert o.shape == shape
        torch.testing.assert_close(o.reshape(view), e, **tolerance,
                                   msg=lambda m: f"call {k}: {m}")


@pytest.mark.parametrize("variant", ["ForeachSOAP", "PaLMForeachSOAP"])
def test_matches_heavyball_between_refreshes(variant):
    """heavyball 0.8.1 agrees until its first refresh after the initialisation (its refresh
    sorts by row sums, §10 row 11); weight decay 0 avoids its sign bug. Full-rank Grams: its
    extra QR at initialisation only permutes the eigenvectors (and rounds them in float32,
    hence the tolerance, for outputs of order one)."""
    heavyball = pytest.importorskip("heavyball")
    shapes = [(6, 6), (5,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = getattr(heavyball, variant)(params, lr=1.0, weight_decay=0.0,
                                      precondition_frequency=1000)
    b2 = palm.palm_beta2(0.8, heavyball_debias=True) if variant.startswith("PaLM") else 0.95
    tx = soap_precondition(b2=b2, precondition_frequency=1000)
    state = tx.init([p.detach() for p in params])
    steps = zip(gradients((6, 6), 6, dtype=torch.float32),
                gradients((5,), 6, seed=1, dtype=torch.float32))
    for k, grads in enumerate(steps):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        out, state = tx.update([g.clone() for g in grads], state)
        for p, x, o in zip(params, before, out):
            torch.testing.assert_close(p.detach() - x, -o, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"call {k}: {m}")


# ---------------------------------------------------------------------------------------------
# Closed forms


def test_first_call_returns_exact_zeros_and_keeps_zero_moments():
    shapes = [(4, 3), (5,), ()]
    params = [torch.zeros(s) for s in shapes]
    grads = [randn(*s, seed=i, dtype=torch.float32) + 1.0 for i, s in enumerate(shapes)]
    tx = soap_precondition()
    out, state = tx.update(grads, tx.init(params), params)
    for o, s in zip(out, shapes):
        assert o.shape == s and o.dtype == torch.float32
        assert torch.equal(o, torch.zeros(s))
    assert state.count == 1
    assert all(not t.any() for t in state.mu + state.nu)


def test_first_real_update_is_the_back_projected_sign():
    """β̂1 = β̂2 = 0 at k = 1: o = P⁻¹(sign(P(G))), so ‖o‖ = √numel; a vector gets sign(g)."""
    g0, g1 = randn(4, 3, seed=1), randn(4, 3, seed=2)
    v0, v1 = randn(7, seed=3), randn(7, seed=4)
    tx = soap_precondition()
    _, state = tx.update([g0.clone(), v0.clone()], tx.init([g0, v0]))
    left, right = (q.clone() for q in state.basis[0])
    (out, vec), _ = tx.update([g1.clone(), v1.clone()], state)
    torch.testing.assert_close(out, left @ torch.sign(left.T @ g1 @ right) @ right.T,
                               rtol=1e-12, atol=1e-14)
    assert torch.linalg.norm(out).item() == pytest.approx(math.sqrt(12), rel=1e-13)
    assert torch.equal(vec, torch.sign(v1))


@pytest.mark.parametrize("shape, max_precond_dim", [((9,), 2048), ((), 2048), ((70, 80), 64)],
                         ids=["vector", "scalar", "both_axes_too_large"])
def test_unrotated_leaves_are_inplace_debiased_adam(shape, max_precond_dim):
    grads = gradients(shape, 20, seed=5)
    outs, state = run_leaf(soap_precondition(b1=0.8, b2=0.9, eps=1e-3,
                                             max_precond_dim=max_precond_dim), grads)
    assert all(q is None for q in state.basis[0] + state.gram[0])
    for k, (o, e) in enumerate(zip(outs, inplace_adam(grads, 0.8, 0.9, 1e-3))):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-15, msg=lambda m: f"call {k}: {m}")


def test_no_first_moment_when_b1_is_zero():
    grads = gradients((5, 4), 6, seed=6)
    tx = soap_precondition(b1=0.0, eps=1e-3, precondition_frequency=100)
    state = tx.init([torch.zeros(5, 4, dtype=F64)])
    for g in grads:
        left, right = state.basis[0]
        left, right = left.clone(), right.clone()
        (out,), state = tx.update([g.clone()], state)
    assert state.mu == [None]
    v = state.nu[0]
    expected = left @ ((left.T @ grads[-1] @ right) / v.sqrt().clamp_min(1e-3)) @ right.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)


def test_normalize_grads_gives_unit_rms_outputs():
    grads = gradients((6, 5), 5, seed=7)
    outs, _ = run_leaf(soap_precondition(normalize_grads=True), grads)
    for o in outs[1:]:
        assert o.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-12)


def test_precondition_1d_rotates_a_vector():
    grads = gradients((6,), 8, seed=8)
    outs, state = run_leaf(soap_precondition(precondition_1d=True), grads)
    (q,) = state.basis[0]
    assert q.shape == (6, 6)
    assert not torch.allclose(outs[1], torch.sign(grads[1]))
    assert torch.linalg.norm(outs[1]).item() == pytest.approx(math.sqrt(6), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Invariances


def test_rotation_equivariance_which_adam_lacks():
    """(G ↦ U G Vᵀ) maps SOAP's updates the same way over refreshes; Adam's do not map."""
    grads = gradients((5, 4), 9, seed=9)
    u, v = orthogonal(5, 10), orthogonal(4, 11)
    turned = [u @ g @ v.T for g in grads]
    tx = soap_precondition(precondition_frequency=2)
    outs, _ = run_leaf(tx, grads)
    outs_turned, _ = run_leaf(tx, turned)
    for k, (o, t) in enumerate(zip(outs, outs_turned)):
        torch.testing.assert_close(t, u @ o @ v.T, rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"call {k}: {m}")
    adam = scale_by_adam()
    a, _ = run_leaf(adam, grads)
    a_turned, _ = run_leaf(adam, turned)
    assert not torch.allclose(a_turned[-1], u @ a[-1] @ v.T, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("shape, axes", [
    ((5, 4), (True, True)), ((5, 4), (False, True)), ((5, 4), (True, False)),
    ((3, 4, 5), (True, False, True)), ((6,), (True,)),
])
def test_projection_round_trip_preserves_the_tensor_and_its_norm(shape, axes):
    x = randn(*shape, seed=12)
    basis = tuple(orthogonal(d, 13 + a) if on else None
                  for a, (d, on) in enumerate(zip(shape, axes)))
    projected = soap._project(x, basis)
    assert projected.shape == shape
    assert torch.linalg.norm(projected).item() == pytest.approx(torch.linalg.norm(x).item(),
                                                                rel=1e-13)
    torch.testing.assert_close(soap._project(projected, basis, back=True), x, rtol=1e-13,
                               atol=1e-14)
    if shape == (5, 4) and all(axes):
        torch.testing.assert_close(projected, basis[0].T @ x @ basis[1], rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Refresh schedule


def test_constant_frequency_refreshes_exactly_at_its_multiples():
    tx = soap_precondition(precondition_frequency=3)
    state = tx.init([torch.zeros(4, 3, dtype=F64)])
    refreshed = []
    for k, g in enumerate(gradients((4, 3), 11, seed=14)):
        before = [q.clone() for q in state.basis[0]]
        _, state = tx.update([g], state)
        if k:
            refreshed.append(all(not torch.equal(a, b) for a, b in zip(before, state.basis[0])))
    assert [k for k, r in enumerate(refreshed, start=1) if r] == [3, 6, 9]
    assert state.refresh_accumulator == 0.0


def test_refresh_due_with_an_integer_frequency_uses_integer_arithmetic():
    assert [refresh_due(4, k, 0.25)[0] for k in range(1, 9)] == \
        [False, False, False, True, False, False, False, True]
    assert refresh_due(7, 10 ** 18 + 6, 0.25) == ((10 ** 18 + 6) % 7 == 0, 0.25)


def test_precond_schedule_refresh_totals_match_the_seed_table():
    """ALGORITHMS.md §5.8 / §11.17: ⌊Σ 1/f(j)⌋ refreshes in k updates."""
    f = precond_schedule()
    intervals = {10: 1.0000508, 100: 1.0260123, 1000: 2.0, 10 ** 4: 14.318295,
                 10 ** 5: 100.22903, 10 ** 6: 513.0}
    expected_sums = {10: 9.99988, 100: 99.1626, 1000: 738.493, 10 ** 4: 2168.157,
                     10 ** 5: 4049.641, 10 ** 6: 7245.352}
    totals = {10: 9, 100: 99, 1000: 738, 10 ** 4: 2168, 10 ** 5: 4049, 10 ** 6: 7245}
    accumulator, refreshes = 0.0, 0
    for k in range(1, 10 ** 6 + 1):
        due, accumulator = refresh_due(f, k, accumulator)
        refreshes += due
        if k in totals:
            assert f(k) == pytest.approx(intervals[k], rel=1e-7)
            assert accumulator == pytest.approx(expected_sums[k], abs=6e-4)
            assert refreshes == totals[k]


def test_scheduled_refreshes_happen_when_the_accumulator_crosses_an_integer():
    def interval(k):  # A = 0.25, 0.5, 0.75, 1 (refresh), 1.5, 2 (refresh), 2.5, 3, 3.5, 4
        return 4.0 if k <= 4 else 2.0

    tx = soap_precondition(precondition_frequency=interval)
    state = tx.init([torch.zeros(3, 3, dtype=F64)])
    refreshed = []
    for k, g in enumerate(gradients((3, 3), 11, seed=15)):
        before = state.basis[0][0].clone()
        _, state = tx.update([g], state)
        if k:
            refreshed.append(not torch.equal(before, state.basis[0][0]))
    assert [k for k, r in enumerate(refreshed, start=1) if r] == [4, 6, 8, 10]
    assert state.refresh_accumulator == 4.0


@pytest.mark.parametrize("shape, options", [((4, 3), {}), ((3, 4, 5), dict(merge_dims=False)),
                                            ((40, 3), dict(max_precond_dim=8))],
                         ids=["matrix", "rank3", "one_axis"])
def test_first_moment_is_kept_where_the_refresh_interval_makes_it_cheaper(shape, options):
    # m lies in the parameters' basis while the bases are refreshed at every update (the
    # debiased EMA of the raw gradients), and in the rotated basis (P of that EMA) from an
    # interval of 2 on
    grads = gradients(shape, 12, seed=21)
    tx = soap_precondition(precondition_frequency=crossing_interval, **options)
    state = tx.init([torch.zeros(shape, dtype=F64)])
    m, placement = torch.zeros(shape, dtype=F64), []
    for k, g in enumerate(grads):
        _, state = tx.update([g.clone()], state)
        if k:
            beta1 = 1 - 0.1 / (1 - 0.9 ** k)
            m = beta1 * m + (1 - beta1) * g
        expected = m
        if state.mu_rotated:
            for axis, q in enumerate(state.basis[0]):
                if q is not None:
                    expected = mode_product(expected, q, axis)
        torch.testing.assert_close(state.mu[0], expected, rtol=1e-10, atol=1e-12)
        placement.append(state.mu_rotated)
    # the basis of m at the next update: interval f(k + 1) >= 2
    assert placement == [False] * 3 + [True] * 4 + [False] * 2 + [True] * 3


def test_refresh_orders_columns_by_column_wise_eigenvalue_estimates():
    """diag(QᵀLQ) (column-wise), not HeavyBall 0.8's row sums diag(L): both Q and v follow it,
    v along the preconditioned (second) axis."""
    L = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64)) + 0.05 * torch.ones(3, 3, dtype=F64)
    anti = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    q = torch.linalg.qr(anti + 0.05 * randn(3, 3, seed=16)).Q
    column_wise = torch.argsort(torch.diag(q.T @ L @ q), descending=True)
    row_wise = torch.argsort(torch.diag(L), descending=True)
    assert not torch.equal(column_wise, row_wise)

    v = randn(5, 3, seed=17).abs() + 0.1
    tx = soap_precondition(b1=0.0, b2=0.9, shampoo_beta=0.5, precondition_frequency=1,
                           max_precond_dim=3)
    state = tx.init([torch.zeros(5, 3, dtype=F64)])
    assert state.basis[0][0] is None
    state = state._replace(count=4, nu=[v.clone()], gram=[(None, L.clone())],
                           basis=[(None, q.clone())])
    _, state = tx.update([torch.zeros(5, 3, dtype=F64)], state)
    decay = 1 - 0.1 / (1 - 0.9 ** 4)
    torch.testing.assert_close(state.nu[0], decay * v[:, column_wise], rtol=1e-14, atol=0)
    expected_q = torch.linalg.qr(0.5 * L @ q[:, column_wise]).Q
    torch.testing.assert_close(state.basis[0][1], expected_q, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(state.nu[0], decay * v[:, row_wise])


# ---------------------------------------------------------------------------------------------
# Axis plan


@pytest.mark.parametrize("shape, expected", [
    ((128, 64, 3, 3), (128, 576)), ((4, 5000, 3, 3), (4, 5000, 9)),
    ((10, 20, 30, 40), (10, 20, 1200)), ((8, 100, 100), (8, 100, 100)),
    ((16, 1, 3, 3), (16, 9)), ((64, 2048), (64, 2048)), ((64, 32, 64), (64, 2048)),
    ((64, 2, 2048), (64, 2, 2048)),
])
def test_heavyball_merge_rule_examples(shape, expected):
    assert merged_shape(shape, 2048) == expected


def test_original_merge_rule_merges_from_the_first_axis():
    assert merged_shape((128, 64, 3, 3), 10000, rule="original") == (8192, 9)
    assert merged_shape((1, 1), 10, rule="original") == (1,)


def test_rank_below_two_and_empty_shapes_are_not_merged():
    assert merged_shape((7,), 2) == (7,)
    assert merged_shape((0, 3, 3), 2048) == (0, 3, 3)


def test_state_follows_the_merged_shape_and_the_output_the_parameter_shape():
    tx = soap_precondition()
    params = [torch.zeros(8, 4, 3, 3)]
    state = tx.init(params)
    assert state.nu[0].shape == (8, 36) and state.mu[0].shape == (8, 36)
    assert [tuple(q.shape) for q in state.basis[0]] == [(8, 8), (36, 36)]
    outs, _ = run(tx, [[g] for g in gradients((8, 4, 3, 3), 3, dtype=torch.float32)], params)
    assert all(o[0].shape == (8, 4, 3, 3) for o in outs)


def test_large_axes_get_no_matrix():
    """A 5000 x 3 leaf with max_precond_dim 64 is rotated on its 3-side only."""
    tx = soap_precondition(max_precond_dim=64)
    params = [torch.zeros(5000, 3), torch.zeros(3000, 40)]
    steps = list(zip(gradients((5000, 3), 3, dtype=torch.float32),
                     gradients((3000, 40), 3, seed=1, dtype=torch.float32)))
    outs, state = run(tx, steps, params)
    assert state.nu[0].shape == (5000, 3)
    assert [None if q is None else tuple(q.shape) for q in state.gram[0]] == [None, (3, 3)]
    assert [None if q is None else tuple(q.shape) for q in state.basis[1]] == [None, (40, 40)]
    matrices = [q for per_leaf in state.gram + state.basis for q in per_leaf if q is not None]
    assert max(q.shape[0] for q in matrices) <= 64
    assert all(torch.isfinite(o).all() for o in outs[-1])


def test_zero_size_leaves_and_empty_parameter_lists():
    tx = soap_precondition()
    params = [torch.zeros(0, 3, dtype=F64), torch.zeros(2, 2, dtype=F64)]
    outs, state = run(tx, [[torch.zeros(0, 3, dtype=F64), g] for g in gradients((2, 2), 3)],
                      params)
    assert state.basis[0] == (None, None)
    assert outs[-1][0].shape == (0, 3) and torch.isfinite(outs[-1][1]).all()
    empty = tx.init([])
    out, empty = tx.update([], empty)
    out, empty = tx.update([], empty)
    assert out == [] and empty.count == 2


# ---------------------------------------------------------------------------------------------
# Second-moment decay, Gram decay, dtypes


def test_palm_beta2_as_b2_equals_palm_beta2_as_a_chain_member():
    grads = gradients((4, 3), 8, seed=18)
    direct, _ = run_leaf(soap_precondition(b2=palm.palm_beta2()), grads)
    chained, _ = run_leaf(chain(palm.palm_beta2(), soap_precondition()), grads)
    plain, _ = run_leaf(soap_precondition(), grads)
    for a, b in zip(direct, chained):
        assert torch.equal(a, b)
    assert not torch.allclose(direct[-1], plain[-1])


def test_palm_beta2_decays_the_grams_with_its_raw_values():
    """Without heavyball_debias, β̂2(k) = β2(k) = 1 - k^-0.8 (no debiasing needed); β2(1) = 0
    replaces the initial Gram at k = 1."""
    grads = gradients((3, 3), 4, seed=19)
    _, state = run_leaf(soap_precondition(b2=palm.palm_beta2(), precondition_frequency=100),
                        grads)
    expected_k2 = (1 - 2 ** -0.8) * gram(grads[1], 1) + 2 ** -0.8 * gram(grads[2], 1)
    expected = (1 - 3 ** -0.8) * expected_k2 + 3 ** -0.8 * gram(grads[3], 1)
    torch.testing.assert_close(state.gram[0][1], expected, rtol=1e-13, atol=1e-14)


def test_shampoo_beta_sets_the_gram_decay():
    grads = gradients((4, 3), 5, seed=20)
    _, state = run_leaf(soap_precondition(shampoo_beta=0.3, precondition_frequency=2), grads)
    expected = [gram(grads[0], a) for a in (0, 1)]
    for g in grads[1:]:
        expected = [0.3 * L + 0.7 * gram(g, a) for a, L in enumerate(expected)]
    for got, want in zip(state.gram[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


def test_bfloat16_parameters_keep_float32_state():
    params = [torch.zeros(6, 4, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.bfloat16)]
    steps = [[g1, g2] for g1, g2 in zip(gradients((6, 4), 4, dtype=torch.bfloat16),
                                        gradients((5,), 4, seed=1, dtype=torch.bfloat16))]
    outs, state = run(soap_precondition(), steps, params)
    tensors = [t for t in state.mu + state.nu] + \
        [q for per_leaf in state.gram + state.basis for q in per_leaf if q is not None]
    assert {t.dtype for t in tensors} == {torch.float32}
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs[-1])
    assert torch.linalg.norm(outs[1][0]).item() == pytest.approx(math.sqrt(24), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Numerical fallbacks


def _eigh_failing(original, dtypes):
    def eigh(matrix, *args, **kwargs):
        if matrix.dtype in dtypes:
            raise torch.linalg.LinAlgError("simulated failure")
        return original(matrix, *args, **kwargs)
    return eigh


def test_eigh_failure_is_retried_in_float64(monkeypatch):
    original = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", _eigh_failing(original, {torch.float32}))
    grads = gradients((5, 4), 6, seed=21, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs, state = run_leaf(soap_precondition(precondition_frequency=100), grads,
                               dtype=torch.float32)
    left = original(gram(grads[0].double(), 0)).eigenvectors.flip(-1).float()
    torch.testing.assert_close(state.basis[0][0], left)
    assert all(torch.isfinite(o).all() for o in outs)


def test_eigh_failing_everywhere_keeps_the_identity_basis_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh",
                        _eigh_failing(torch.linalg.eigh, {torch.float32, torch.float64}))
    grads = gradients((5, 4), 4, seed=22, dtype=torch.float32)
    tx = soap_precondition(precondition_frequency=100)
    state = tx.init([torch.zeros(5, 4)])
    with pytest.warns(RuntimeWarning, match="eigh") as caught:
        _, state = tx.update([grads[0]], state)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    assert all(torch.equal(q, torch.eye(q.shape[0])) for q in state.basis[0])
    for g in grads[1:]:
        (out,), state = tx.update([g], state)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("count", [0, 3])
def test_non_finite_gradient_skips_the_step_or_raises_when_strict(count):
    grads = gradients((4, 3), count + 1, seed=23)
    tx = soap_precondition()
    _, state = run_leaf(tx, grads[:count]) if count else (None, tx.init([grads[0]]))
    frozen = [t.clone() for t in state.nu + state.mu if t is not None] + \
        [q.clone() for q in state.gram[0] + state.basis[0]]
    bad = grads[-1].clone()
    bad[1, 2] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        (out,), after = tx.update([bad], state)
    assert caught[0].filename == __file__
    assert torch.equal(out, torch.zeros(4, 3, dtype=F64))
    assert after.count == count
    now = [t for t in after.nu + after.mu if t is not None] + list(after.gram[0] + after.basis[0])
    assert all(torch.equal(a, b) for a, b in zip(frozen, now))
    bad[1, 2] = math.inf
    with pytest.raises(FloatingPointError):
        soap_precondition(strict=True).update([bad], state)
    assert all(torch.equal(a, b) for a, b in zip(frozen, now))


# ---------------------------------------------------------------------------------------------
# Contracts: state layout, ownership, validation


def test_state_round_trips_through_flatten_and_unflatten():
    params = [torch.zeros(4, 3, dtype=F64), torch.zeros(5, dtype=F64)]
    steps = [[g1, g2] for g1, g2 in zip(gradients((4, 3), 4), gradients((5,), 4, seed=1))]
    tx = soap_precondition(precondition_frequency=precond_schedule())
    _, state = run(tx, steps, params)
    per_param, group = flatten_state(state, 2)
    assert set(per_param[0]) == {"mu", "nu", "gram.0", "gram.1", "basis.0", "basis.1"}
    assert set(per_param[1]) == {"mu", "nu"}
    assert set(group) == {"count", "refresh_accumulator", "mu_rotated"}
    restored = unflatten_state(tx.init(params), per_param, group)
    a, _ = tx.update([g.clone() for g in steps[0]], state)
    b, _ = tx.update([g.clone() for g in steps[0]], restored)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    no_momentum = soap_precondition(b1=0.0)
    per_param, _ = flatten_state(run(no_momentum, steps[:2], params)[1], 2)
    assert "mu" not in per_param[0]


def test_outputs_are_fresh_and_the_input_is_untouched():
    tx = soap_precondition()
    params = [torch.zeros(4, 3, dtype=F64), torch.zeros(5, dtype=F64), torch.zeros((), dtype=F64)]
    state = tx.init(params)
    for step in range(3):
        grads = [randn(*p.shape, seed=30 + step) for p in params]
        copies = [g.clone() for g in grads]
        out, state = tx.update(grads, state)
        assert all(torch.equal(g, c) for g, c in zip(grads, copies))
        storages = {t.untyped_storage().data_ptr() for t in state.nu + state.mu}
        assert not any(o.untyped_storage().data_ptr() in storages for o in out)


@pytest.mark.parametrize("options", [dict(), dict(b1=0.0), dict(normalize_grads=True),
                                     dict(eps_mode="add", debias="adam"),
                                     dict(precondition_frequency=1),
                                     dict(precondition_frequency=crossing_interval)])
@pytest.mark.parametrize("tensors", [False, True])
def test_into_params_adds_the_outputs_with_the_same_numbers(options, tensors):
    # every kind of leaf: matrices rotated on both axes, on the first or the last only (the
    # other above max_precond_dim), a 4-d leaf merged into a matrix, a rank-3 leaf, vectors, a
    # scalar and an empty leaf; over the initialising call, refreshes and a skipped step;
    # x <- x + b x + a o against update() and that addition, with a and b numbers or 0-d
    # tensors (learning rates as tensors)
    shapes = [(6, 5), (30, 4), (4, 30), (4, 3, 2, 2), (3, 4, 25), (7,), (), (0, 3), (5, 6)]
    tx = soap_precondition(**{"precondition_frequency": 2, "max_precond_dim": 12, **options})
    a, b = (torch.tensor(-0.1, dtype=F64), torch.tensor(-0.01, dtype=F64)) if tensors else \
        (-0.1, -0.01)
    x_a = [randn(*s, seed=k) for k, s in enumerate(shapes)]
    x_b = [x.clone() for x in x_a]
    state_a, state_b = tx.init(x_a), tx.init(x_b)
    for t in range(6):
        grads = [randn(*s, seed=100 * t + k) for k, s in enumerate(shapes)]
        if t == 3:
            grads[0][0, 0] = math.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step
            out, state_a = tx.update(grads, state_a, x_a)
            add_scaled_(x_a, out, a, b)
            state_b = tx.into_params(grads, state_b, x_b, a, b)
        assert all(torch.equal(p, q) for p, q in zip(x_a, x_b))
    assert state_a.count == state_b.count == 5
    for name in ("mu", "nu"):
        assert all(p is q is None or torch.equal(p, q)
                   for p, q in zip(getattr(state_a, name), getattr(state_b, name)))


def test_dict_trees_keep_their_structure():
    tx = soap_precondition()
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    out, state = tx.update({"w": torch.ones(3, 2), "b": torch.ones(2)}, tx.init(params))
    assert list(out) == ["w", "b"]


def test_it_is_not_leafwise():
    tx = soap_precondition()
    assert not tx.leafwise and not tx.elementwise and not tx.terminal


def test_sparse_and_complex_updates_are_rejected():
    tx = soap_precondition()
    with pytest.raises(ValueError, match="soap_precondition"):
        tx.update([torch.eye(3).to_sparse()], tx.init([torch.zeros(3, 3)]))
    with pytest.raises(ValueError, match="soap_precondition"):
        tx.update([torch.ones(3, dtype=torch.complex64)], tx.init([torch.zeros(3)]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=-0.1), "b1"), (dict(b1=1.0), "b1"), (dict(b1=math.nan), "b1"), (dict(b1="0.9"), "b1"),
    (dict(b2=1.0), "b2"), (dict(b2=-0.5), "b2"), (dict(shampoo_beta=1.5), "shampoo_beta"),
    (dict(eps=-1e-8), "eps"), (dict(eps=math.nan), "eps"), (dict(eps_mode="sum"), "eps_mode"),
    (dict(debias="none"), "debias"), (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(precondition_frequency=2.5), "precondition_frequency"),
    (dict(precondition_frequency=True), "precondition_frequency"),
    (dict(precondition_frequency="2"), "precondition_frequency"),
    (dict(max_precond_dim=0), "max_precond_dim"), (dict(max_precond_dim=64.0), "max_precond_dim"),
    (dict(merge_rule="fancy"), "merge_rule"),
])
def test_invalid_hyperparameters_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        soap_precondition(**kwargs)


def test_soap_docstring_examples_run():
    result = doctest.testmod(soap)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("shape", [(517, 300), (300, 517), (1100, 7), (256, 40), (3, 9)])
@pytest.mark.parametrize("transposed", [False, True])
def test_blocked_gram_equals_the_plain_product(shape, transposed):
    """The Gram accumulation computes off-diagonal blocks once, below the diagonal, and
    ``_symmetrize_`` mirrors them: the plain :math:`\\beta L + \\alpha A A^\\top`, for odd sizes
    and strided (transposed) A."""
    torch.manual_seed(0)
    a = torch.randn(shape, dtype=torch.float64)
    a = a.T if transposed else a
    start = torch.randn(a.shape[0], a.shape[0], dtype=torch.float64)
    start = start + start.T
    gram = start.clone()
    soap._add_gram_(gram, a, 0.9, 0.1)
    expected = 0.9 * start + 0.1 * a @ a.T
    torch.testing.assert_close(gram.tril(), expected.tril(), rtol=1e-12, atol=1e-12)
    soap._symmetrize_(gram)
    torch.testing.assert_close(gram, expected, rtol=1e-12, atol=1e-12)


def test_a_gram_that_overflowed_keeps_its_basis_and_never_reaches_the_update():
    tx = soap.soap_precondition(precondition_frequency=1)
    torch.manual_seed(0)
    params = [torch.randn(5, 3)]
    state = tx.init(params)
    for _ in range(2):  # the first real update replaces the Grams (its debiased decay is 0)
        _, state = tx.update([torch.randn(5, 3)], state, params)
    state.gram[0][0].fill_(math.inf)
    left, right = (q.clone() for q in state.basis[0])
    with pytest.warns(RuntimeWarning, match="not finite") as caught:
        out, state = tx.update([torch.randn(5, 3)], state, params)
    assert caught[0].filename == __file__
    assert torch.equal(state.basis[0][0], left)
    assert not torch.equal(state.basis[0][1], right)  # the finite axis is refreshed
    assert out[0].isfinite().all() and state.mu[0].isfinite().all()
