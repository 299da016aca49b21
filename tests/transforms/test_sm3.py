"""scale_by_sm3 (ALGORITHMS.md §1, §11 items 3-6): closed forms, invariants, sparse rows,
contracts and validation. Parity with the torch-SM3 package is in
tests/optimizers/test_sm3_optimizer.py."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from gradchain.core import add_scaled_, flatten_state, leaves
from gradchain.transforms import sm3 as sm3_module
from gradchain.transforms.sm3 import SM3State, scale_by_sm3

F64 = torch.float64
G23 = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def run(tx, grads_per_step, params):
    """Outputs of successive updates, each cloned, and the final state."""
    state = tx.init(params)
    outs = []
    for grads in grads_per_step:
        out, state = tx.update(grads, state, params)
        outs.append([o.clone() for o in leaves(out)])
    return outs, state


def random_grads(shape, steps, seed=0, zeros=0.0, spread=True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        g = torch.randn(shape, generator=gen, dtype=F64)
        if spread:
            g = g * torch.exp(torch.randn(shape, generator=gen, dtype=F64))
        if zeros:
            g = torch.where(torch.rand(shape, generator=gen, dtype=F64) < zeros, 0.0, g)
        out.append(g)
    return out


def adagrad(grads):
    """Diagonal Adagrad directions g_t / sqrt(sum_s g_s^2), 0 where the sum is 0 (numpy)."""
    total = np.zeros(grads[0].shape)
    outs = []
    for g in grads:
        g = g.numpy()
        total = total + g * g
        with np.errstate(invalid="ignore", divide="ignore"):
            outs.append(np.where(total > 0, g / np.sqrt(total), 0.0))
    return outs


def sparse_rows(rows, values, shape):
    return torch.sparse_coo_tensor(torch.tensor([rows]), torch.as_tensor(values, dtype=F64),
                                   shape, check_invariants=True)


# ---------------------------------------------------------------------------------------------
# §11 items 3 and 4: the 2x3 hand example


def test_hand_example_outputs_and_accumulators_exactly():
    tx = scale_by_sm3(b1=0.0, b2=1.0, eps=0.0)
    g = torch.tensor(G23, dtype=F64)
    (first,), (second,) = run(tx, [[g], [g]], [torch.zeros(2, 3, dtype=F64)])[0]
    assert torch.equal(first, torch.ones(2, 3, dtype=F64))
    nu2 = [[10.0, 13.0, 18.0], [32.0, 50.0, 72.0]]
    expected = torch.tensor([[G23[i][j] / math.sqrt(nu2[i][j]) for j in range(3)]
                             for i in range(2)], dtype=F64)
    torch.testing.assert_close(second, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(second, torch.tensor(
        [[0.316228, 0.554700, 0.707107], [0.707107, 0.707107, 0.707107]], dtype=F64),
        rtol=0, atol=1e-6)
    state = run(tx, [[g], [g]], [torch.zeros(2, 3, dtype=F64)])[1]
    rows, columns = state.mu[0]
    assert rows.shape == (2, 1) and columns.shape == (1, 3)
    assert rows.flatten().tolist() == [18.0, 72.0]
    assert columns.flatten().tolist() == [32.0, 50.0, 72.0]
    # Adagrad's exact accumulator [[2, 8, 18], [32, 50, 72]] is below nu_2 everywhere
    assert (torch.tensor([[2.0, 8, 18], [32, 50, 72]]) <= torch.tensor(nu2)).all()


def test_hand_example_with_momentum_and_eps_matches_the_closed_form():
    eps = 1e-8
    tx = scale_by_sm3(b1=0.9, eps=eps)
    g = torch.tensor(G23, dtype=F64)
    (first,), (second,) = run(tx, [[g], [g]], [torch.zeros(2, 3, dtype=F64)])[0]
    p1 = g / torch.sqrt(g * g + eps)
    torch.testing.assert_close(first, 0.1 * p1, rtol=1e-15, atol=0)
    assert first[0, 0].item() == pytest.approx(0.1, abs=1e-9)
    expected00 = 0.9 * 0.1 / math.sqrt(1 + eps) + 0.1 / math.sqrt(10 + eps)
    assert second[0, 0].item() == pytest.approx(expected00, rel=1e-14)
    assert second[0, 0].item() == pytest.approx(0.1216228, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# §1.10 / §11 item 5: Adagrad special cases


@pytest.mark.parametrize("shape", [(), (1,), (7,)])
def test_rank_0_and_1_leaves_are_diagonal_adagrad(shape):
    grads = random_grads(shape, 12, zeros=0.3)
    grads[0] = torch.zeros(shape, dtype=F64)  # an all-zero history: 0, not 0/0
    outs, state = run(scale_by_sm3(eps=0.0), [[g] for g in grads], [torch.zeros(shape, dtype=F64)])
    for t, (out, expected) in enumerate(zip(outs, adagrad(grads))):
        np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-14, atol=0,
                                   err_msg=f"step {t}")
    assert len(state.mu[0]) == 1 and state.mu[0][0].shape == shape
    torch.testing.assert_close(state.mu[0][0], sum(g * g for g in grads), rtol=1e-14, atol=0)


@pytest.mark.parametrize("axis", [0, 1])
def test_gradients_constant_along_an_axis_give_adagrad(axis):
    # g_t(i, j) = a_t(i) (or a_t(j)): the accumulator of the varying axis always wins the min
    vectors = random_grads((5,), 15, seed=3, zeros=0.2)
    shape = (5, 4) if axis == 0 else (4, 5)
    grads = [(v[:, None] if axis == 0 else v[None, :]).expand(shape).contiguous()
             for v in vectors]
    outs, _ = run(scale_by_sm3(eps=0.0), [[g] for g in grads], [torch.zeros(shape, dtype=F64)])
    for t, (out, expected) in enumerate(zip(outs, adagrad(grads))):
        np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-14, atol=0,
                                   err_msg=f"step {t}")


def test_gradients_constant_along_two_axes_of_a_3d_leaf_give_adagrad():
    vectors = random_grads((3,), 10, seed=4)
    grads = [v[None, :, None].expand(2, 3, 4).contiguous() for v in vectors]
    outs, _ = run(scale_by_sm3(eps=0.0), [[g] for g in grads], [torch.zeros(2, 3, 4, dtype=F64)])
    for out, expected in zip(outs, adagrad(grads)):
        np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (4, 1, 3)])
def test_sm3_upper_bounds_adagrad_and_never_steps_further(shape):
    grads = random_grads(shape, 30, seed=5, zeros=0.2)
    tx = scale_by_sm3(eps=0.0)
    state = tx.init([torch.zeros(shape, dtype=F64)])
    total = torch.zeros(shape, dtype=F64)
    for t, g in enumerate(grads):
        out, state = tx.update([g], state)
        total += g * g
        bound = state.mu[0][0]
        for accumulator in state.mu[0][1:]:
            bound = torch.minimum(bound, accumulator)
        # min over the cover of the new accumulators >= nu_t >= Adagrad's accumulator
        assert (bound >= total * (1 - 1e-15)).all(), f"step {t}"
        adagrad_step = torch.where(total > 0, g.abs() / total.sqrt(), 0.0)
        assert (out[0].abs() <= adagrad_step * (1 + 1e-14)).all(), f"step {t}"


def test_a_size_one_axis_behaves_like_a_vector():
    grads = random_grads((6,), 10, seed=6)
    vector, _ = run(scale_by_sm3(), [[g] for g in grads], [torch.zeros(6, dtype=F64)])
    column, _ = run(scale_by_sm3(), [[g[:, None]] for g in grads],
                    [torch.zeros(6, 1, dtype=F64)])
    for a, b in zip(vector, column):
        assert torch.equal(a[0], b[0][:, 0])


# ---------------------------------------------------------------------------------------------
# EMA variant (§1.6) and momentum


def test_ema_assign_decays_the_accumulators_and_running_max_does_not():
    shape = (3, 4)
    grads = [torch.full(shape, 10.0, dtype=F64)] + [torch.full(shape, 0.1, dtype=F64)] * 6
    params = [torch.zeros(shape, dtype=F64)]
    _, assign = run(scale_by_sm3(b2=0.9), [[g] for g in grads], params)
    _, running = run(scale_by_sm3(b2=0.9, ema_accumulator_rule="running_max"),
                     [[g] for g in grads], params)
    # assign: mu_1 = 0.1 * 100 = 10, then mu <- 0.9 mu + 0.1 * 0.01, i.e. 0.01 + 9.99 * 0.9^(t-1)
    expected = 0.01 + 9.99 * 0.9 ** (len(grads) - 1)
    for accumulator in assign.mu[0]:
        torch.testing.assert_close(accumulator, torch.full_like(accumulator, expected),
                                   rtol=1e-13, atol=0)
    _, first = run(scale_by_sm3(b2=0.9, ema_accumulator_rule="running_max"), [[grads[0]]],
                   params)
    for accumulator, initial in zip(running.mu[0], first.mu[0]):
        assert torch.equal(accumulator, initial)  # never decreased
        torch.testing.assert_close(accumulator, torch.full_like(accumulator, 10.0),
                                   rtol=1e-15, atol=0)


def test_ema_first_step_is_plus_minus_one_over_root_one_minus_b2():
    g = torch.tensor([[3.0, -0.5], [2e-3, -7.0]], dtype=F64)
    (out,), = run(scale_by_sm3(b2=0.999, eps=0.0), [[g]], [torch.zeros(2, 2, dtype=F64)])[0]
    torch.testing.assert_close(out, torch.sign(g) / math.sqrt(1 - 0.999), rtol=1e-12, atol=0)


def test_momentum_is_an_unbiased_ema_of_the_preconditioned_gradient():
    grads = random_grads((4, 3), 8, seed=7)
    plain, _ = run(scale_by_sm3(), [[g] for g in grads], [torch.zeros(4, 3, dtype=F64)])
    moving, _ = run(scale_by_sm3(b1=0.8), [[g] for g in grads], [torch.zeros(4, 3, dtype=F64)])
    m = torch.zeros(4, 3, dtype=F64)
    for p, o in zip(plain, moving):
        m = 0.8 * m + 0.2 * p[0]
        torch.testing.assert_close(o[0], m, rtol=1e-13, atol=1e-16)


# ---------------------------------------------------------------------------------------------
# The 0/0 guard (§1.5 step 3, §1.9)


def test_zero_gradients_with_zero_history_give_zero_not_nan():
    g = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    outs, _ = run(scale_by_sm3(eps=0.0), [[g], [g]], [torch.zeros(2, 3, dtype=F64)])
    for t, (out,) in enumerate(outs, start=1):
        expected = torch.zeros(2, 3, dtype=F64)
        expected[0, 1] = 1 / math.sqrt(t)
        assert torch.equal(out, expected)


def test_guard_does_not_rely_on_eps():
    # g^2 underflows to 0 in float32: nu = 0, and the output is 0, not g / sqrt(eps) = 1e-15
    g = torch.full((2, 2), 1e-30)
    for shape in [(2, 2), (4,)]:
        (out,), = run(scale_by_sm3(eps=1e-30), [[g.reshape(shape)]],
                      [torch.zeros(shape)])[0]
        assert torch.equal(out, torch.zeros(shape))


def test_zero_rows_and_columns_stay_guarded_in_later_steps(monkeypatch):
    # rows 1 and 6 and column 2 never see a gradient; blocks of 2 rows planned from the
    # accumulators, so only some blocks are guarded
    monkeypatch.setattr(sm3_module, "BLOCK_ELEMENTS", 10)
    monkeypatch.setattr(sm3_module, "PLAN_ELEMENTS", 0)
    mask = torch.ones(8, 5, dtype=F64)
    mask[[1, 6]] = 0.0
    for column in [None, 2]:
        if column is not None:
            mask[:, column] = 0.0
        grads = [g * mask for g in random_grads((8, 5), 5, seed=8)]
        outs, _ = run(scale_by_sm3(eps=0.0), [[g] for g in grads], [torch.zeros(8, 5, dtype=F64)])
        for out, g in zip(outs, grads):
            assert torch.isfinite(out[0]).all()
            assert torch.equal(out[0] == 0, g == 0)


@pytest.mark.parametrize("eps", [0.0, 1e-30, 1e-20, 1e-3])
@pytest.mark.parametrize("b2", [1.0, 0.9])
def test_blocks_and_plans_give_bitwise_the_same_result(monkeypatch, eps, b2):
    # rows of very different scales (and zero rows), so that eps matters for some blocks only
    shapes = [(12, 4), (6, 3, 2), (9,), ()]
    scales = {s: torch.logspace(-9, 0, s[0], dtype=F64).reshape((-1,) + (1,) * (len(s) - 1))
              if s else torch.tensor(1.0, dtype=F64) for s in shapes}
    grads = [[g * scales[s] for g, s in zip(gs, shapes)]
             for gs in zip(*(random_grads(s, 6, seed=9 + k, zeros=0.2)
                             for k, s in enumerate(shapes)))]
    for t in range(3):
        grads[t][0][5] = 0.0  # a row that starts late
    params = [torch.zeros(s, dtype=F64) for s in shapes]
    results = []
    for block, plan in [(1 << 40, 1 << 40), (1, 0), (6, 0), (8, 1 << 40), (1 << 40, 0)]:
        monkeypatch.setattr(sm3_module, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(sm3_module, "PLAN_ELEMENTS", plan)
        results.append(run(scale_by_sm3(b1=0.5, b2=b2, eps=eps), grads, params))
    (reference, reference_state), *others = results
    for outs, state in others:
        for a, b in zip(outs, reference):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        for a, b in zip(state.mu, reference_state.mu):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("b1, b2, eps", [(0.0, 1.0, 0.0), (0.5, 0.9, 1e-30), (0.3, 0.7, 1e-3)])
def test_the_whole_leaf_path_for_compile_and_gpus_gives_bitwise_the_same_result(monkeypatch, b1,
                                                                                b2, eps):
    shapes = [(9, 4), (5, 3, 2), (7,), (), (4, 1)]
    grads = [list(gs) for gs in zip(*(random_grads(s, 6, seed=20 + k, zeros=0.3)
                                      for k, s in enumerate(shapes)))]
    params = [torch.zeros(s, dtype=F64) for s in shapes]
    blocked = run(scale_by_sm3(b1=b1, b2=b2, eps=eps), grads, params)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    whole = run(scale_by_sm3(b1=b1, b2=b2, eps=eps), grads, params)
    for a, b in zip(blocked[0], whole[0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for a, b in zip(blocked[1].mu, whole[1].mu):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_plan_skips_the_guard_and_eps_only_where_they_are_idle():
    plan = sm3_module._Rule(0.0, 1.0, 1.0, 1e-20, False)._plan(
        (torch.tensor([[0.0], [1e-30], [1.0], [4.0]], dtype=F64),
         torch.tensor([[2.0, 3.0]], dtype=F64)), 1, F64)
    assert plan == [(True, True), (False, True), (False, False), (False, False)]
    # b2 = 0.5: the floor is d * mu = 0.5, whose spacing is half that of 1.0
    halved = sm3_module._Rule(0.0, 0.5, 0.5, 8e-17, False)._plan(
        (torch.tensor([1.0, 4.0], dtype=F64),), 1, F64)
    assert 1.0 + 8e-17 == 1.0 and 0.5 + 8e-17 != 0.5
    assert halved == [(False, True), (False, False)]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d", [1.0, 0.9])
def test_the_plan_shortcut_skips_only_where_every_block_would(dtype, d):
    # accumulators spread over 40 decades, eps from far below to far above the smallest of them:
    # whatever the shortcut decides must be what the exact per-block rule decides
    rule = sm3_module._Rule(0.0, 1.0 - d if d < 1 else 1.0, d, 0.0, False)
    gen = torch.Generator().manual_seed(0)
    shortcuts = 0
    for trial in range(200):
        low = 10.0 ** torch.empty(1).uniform_(-30, 10, generator=gen).item()
        rows = (low * torch.exp(torch.rand(16, 1, generator=gen, dtype=F64) * 3)).to(dtype)
        columns = (low * torch.exp(torch.rand(1, 5, generator=gen, dtype=F64) * 3)).to(dtype)
        eps = low * 10.0 ** torch.empty(1).uniform_(-20, 2, generator=gen).item()
        exact = rule._replace(eps=eps)
        plan = exact._plan((rows, columns), 4, dtype)
        floor = (torch.minimum(rows.reshape(-1), columns.amin()) * d).view(4, 4).amin(dim=1)
        expected = [(False, bool((f + eps != f).item())) for f in floor]
        assert plan == expected or plan == [(False, True)] * 4 and all(e for _, e in expected)
        shortcuts += plan == [(False, False)] * 4
    assert 20 < shortcuts < 180  # both sides of the margin are exercised


def test_small_vectors_together_give_bitwise_the_per_leaf_result(monkeypatch):
    # foreach over the small rank <= 1 leaves against one leaf at a time (PLAN_ELEMENTS = 0):
    # zeros, signs, an underflowing g^2 (nu = 0 with g != 0), and a larger vector in between
    shapes = [(7,), (), (3000,), (5,)]
    grads = [list(gs) for gs in zip(*(random_grads(s, 5, seed=30 + k, zeros=0.3)
                                      for k, s in enumerate(shapes)))]
    for step in range(2):
        grads[step][0][2] = -1e-200
        grads[step][3][1] = 3e-170
    params = [torch.zeros(s, dtype=F64) for s in shapes]
    for b1, b2, rule in [(0.0, 1.0, "assign"), (0.5, 0.9, "assign"), (0.3, 0.8, "running_max")]:
        together = run(scale_by_sm3(b1=b1, b2=b2, eps=1e-300, ema_accumulator_rule=rule),
                       grads, params)
        with monkeypatch.context() as patch:
            patch.setattr(sm3_module, "PLAN_ELEMENTS", 0)
            alone = run(scale_by_sm3(b1=b1, b2=b2, eps=1e-300, ema_accumulator_rule=rule),
                        grads, params)
        assert together[0][0][0][2] == 0 and together[0][0][3][1] == 0  # guarded
        for a, b in zip(together[0], alone[0]):
            assert all(torch.equal(x, y) and torch.equal(x.signbit(), y.signbit())
                       for x, y in zip(a, b))
        for a, b in zip(together[1].mu, alone[1].mu):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        if b1:
            assert all(torch.equal(x, y) for x, y in zip(together[1].momentum, alone[1].momentum))


@pytest.mark.parametrize("b1, b2, eps, rule", [(0.0, 1.0, 1e-30, "assign"),
                                             (0.5, 0.9, 0.0, "assign"),
                                             (0.3, 0.8, 1e-3, "running_max")])
def test_into_params_adds_the_outputs_with_the_same_numbers(monkeypatch, b1, b2, eps, rule):
    # every kind of leaf: blocked matrices and a 3-d tensor (blocks of 2 rows), a long vector
    # (blocked), small vectors and a scalar (foreach, or one leaf each with eps = 0), an empty
    # leaf and row-sparse gradients; x <- x + b x + a o against update() and that addition
    monkeypatch.setattr(sm3_module, "BLOCK_ELEMENTS", 8)
    monkeypatch.setattr(sm3_module, "PLAN_ELEMENTS", 20)
    shapes = [(9, 4), (5, 3, 2), (40,), (7,), (), (0, 3), (6, 3)]
    grads = [list(gs) for gs in zip(*(random_grads(s, 4, seed=40 + k, zeros=0.2)
                                      for k, s in enumerate(shapes)))]
    for t, step in enumerate(grads):
        step[-1] = sparse_rows([t % 6, 5, 2], torch.randn(3, 3, dtype=F64), (6, 3))
    for a, b in [(-0.1, 0.0), (-0.1, -0.01)]:
        tx = scale_by_sm3(b1=b1, b2=b2, eps=eps, ema_accumulator_rule=rule)
        x_a = [torch.randn(s, dtype=F64, generator=torch.Generator().manual_seed(k))
               for k, s in enumerate(shapes)]
        x_b = [x.clone() for x in x_a]
        state_a, state_b = tx.init(x_a), tx.init(x_b)
        for step in grads:
            out, state_a = tx.update(step, state_a, x_a)
            add_scaled_(x_a, out, a, b)
            state_b = tx.into_params(step, state_b, x_b, a, b)
            assert all(torch.equal(p, q) for p, q in zip(x_a, x_b))
        for m_a, m_b in zip(state_a.mu, state_b.mu):
            assert all(torch.equal(p, q) for p, q in zip(m_a, m_b))
        if b1:
            assert all(torch.equal(p, q) for p, q in zip(state_a.momentum, state_b.momentum))


# ---------------------------------------------------------------------------------------------
# Sparse rows (§1.7, §11 item 6)


def row_cover(mu0, rows, values, c=1.0, d=1.0):
    """The row-cover rule written out row by row (numpy): returns outputs, new mu0."""
    mu0 = mu0.copy()
    out = np.zeros_like(values)
    for k, j in enumerate(rows):
        nu = d * mu0[j] + c * values[k] ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(nu > 0, values[k] / np.sqrt(nu), 0.0)
        mu0[j] = nu.max()
    return out, mu0


def test_sparse_step_updates_only_the_present_rows():
    shape = (6, 3)
    tx = scale_by_sm3(b1=0.9, eps=0.0)
    params = [torch.zeros(shape, dtype=F64)]
    state = tx.init(params)
    for g in random_grads(shape, 3, seed=10):  # some dense history first
        _, state = tx.update([g], state)
    rows0 = state.mu[0][0].flatten().clone()
    columns0 = state.mu[0][1].clone()
    momentum0 = state.momentum[0].clone()
    values = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=F64)
    out, state = tx.update([sparse_rows([4, 1], values, shape)], state)
    out = out[0]
    assert out.is_sparse and out.is_coalesced()
    assert out.indices().tolist() == [[1, 4]]
    expected, mu0 = row_cover(rows0.numpy(), [1, 4], values.flip(0).numpy())
    np.testing.assert_allclose(out.values().numpy(), expected, rtol=1e-15, atol=0)
    rows1 = state.mu[0][0].flatten()
    np.testing.assert_allclose(rows1.numpy(), mu0, rtol=1e-15, atol=0)
    untouched = [0, 2, 3, 5]
    assert torch.equal(rows1[untouched], rows0[untouched])
    assert torch.equal(state.mu[0][1], columns0)  # not maintained by sparse steps
    assert torch.equal(state.momentum[0], momentum0)  # momentum is ignored for sparse leaves


def test_sparse_duplicate_rows_are_summed_before_the_update():
    shape = (4, 2)
    duplicated = torch.sparse_coo_tensor(torch.tensor([[2, 0, 2]]),
                                         torch.tensor([[1.0, 2.0], [3.0, 0.0], [4.0, -1.0]],
                                                      dtype=F64), shape, check_invariants=True)
    summed = sparse_rows([0, 2], [[3.0, 0.0], [5.0, 1.0]], shape)
    a, state_a = run(scale_by_sm3(eps=0.0), [[duplicated]] * 2, [torch.zeros(shape, dtype=F64)])
    b, state_b = run(scale_by_sm3(eps=0.0), [[summed]] * 2, [torch.zeros(shape, dtype=F64)])
    for x, y in zip(a, b):
        assert torch.equal(x[0].indices(), y[0].indices())
        assert torch.equal(x[0].values(), y[0].values())
    assert torch.equal(state_a.mu[0][0], state_b.mu[0][0])
    # the first summed step is g / |g| row by row, hence 1, 0, 1, 1
    assert a[0][0].values().tolist() == [[1.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("b2", [1.0, 0.7])
def test_sparse_with_every_row_present_is_the_row_cover_algorithm(b2):
    shape = (5, 3, 2)
    grads = random_grads(shape, 8, seed=11, zeros=0.2)
    tx = scale_by_sm3(b2=b2, eps=0.0)
    state = tx.init([torch.zeros(shape, dtype=F64)])
    c, d = (1.0, 1.0) if b2 == 1.0 else (1 - b2, b2)
    mu0 = np.zeros((5, 1, 1))
    for t, g in enumerate(grads):
        out, state = tx.update([g.to_sparse(1)], state)
        expected, mu0 = row_cover(mu0, range(5), g.numpy(), c, d)
        np.testing.assert_allclose(out[0].to_dense().numpy(), expected, rtol=1e-14, atol=0,
                                   err_msg=f"step {t}")
        np.testing.assert_allclose(state.mu[0][0].numpy(), mu0, rtol=1e-14, atol=0)


def test_sparse_running_max_rule_keeps_the_row_maximum():
    shape = (3, 2)
    tx = scale_by_sm3(b2=0.5, ema_accumulator_rule="running_max")
    state = tx.init([torch.zeros(shape, dtype=F64)])
    _, state = tx.update([sparse_rows([0, 2], [[4.0, 2.0], [2.0, 0.0]], shape)], state)
    assert state.mu[0][0].flatten().tolist() == [8.0, 0.0, 2.0]  # 0.5 * 16, 0.5 * 4
    _, state = tx.update([sparse_rows([0], [[0.0, 0.0]], shape)], state)
    assert state.mu[0][0].flatten().tolist() == [8.0, 0.0, 2.0]  # 0.5 * 8 = 4 < 8


def test_rank_1_sparse_leaf_is_per_entry_adagrad_on_the_present_entries():
    n = 5
    entries = [[0, 3], [3], [1, 3, 4], [0]]
    grads = random_grads((n,), len(entries), seed=12)
    dense = [torch.zeros(n, dtype=F64).index_copy(0, torch.tensor(e), g[e])
             for e, g in zip(entries, grads)]
    tx = scale_by_sm3(eps=0.0)
    state = tx.init([torch.zeros(n, dtype=F64)])
    for e, g, full, expected in zip(entries, grads, dense, adagrad(dense)):
        out, state = tx.update([sparse_rows(e, g[e], (n,))], state)
        assert out[0].indices().flatten().tolist() == e
        np.testing.assert_allclose(out[0].values().numpy(), expected[e], rtol=1e-15, atol=0)
    torch.testing.assert_close(state.mu[0][0], sum(d * d for d in dense), rtol=1e-15, atol=0)


def test_empty_sparse_gradient_changes_nothing():
    tx = scale_by_sm3()
    params = [torch.zeros(4, 3, dtype=F64)]
    state = tx.init(params)
    _, state = tx.update([torch.ones(4, 3, dtype=F64)], state)
    before = [a.clone() for a in state.mu[0]]
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                    torch.zeros(0, 3, dtype=F64), (4, 3), check_invariants=True)
    out, state = tx.update([empty], state)
    assert out[0].is_sparse and out[0]._nnz() == 0
    assert all(torch.equal(a, b) for a, b in zip(state.mu[0], before))


def test_sparse_gradient_of_a_16bit_parameter():
    tx = scale_by_sm3()
    state = tx.init([torch.zeros(3, 2, dtype=torch.bfloat16)])
    g = sparse_rows([1], [[2.0, -1.0]], (3, 2)).float()
    out, state = tx.update([g], state)
    assert out[0].to_dense()[1].tolist() == [1.0, -1.0]
    out, state = tx.update([g], state)  # nu = max(4, 1) + g^2 = (8, 5)
    assert state.mu[0][0].dtype == torch.float32 and out[0].dtype == torch.float32
    torch.testing.assert_close(out[0].to_dense()[1], torch.tensor([2 / 8 ** 0.5, -1 / 5 ** 0.5]))


def test_sparse_layouts_other_than_rows_are_rejected():
    tx = scale_by_sm3()
    state = tx.init([torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="scale_by_sm3 .*sparse_dim 1"):
        tx.update([torch.ones(3, 2).to_sparse()], state)  # sparse_dim 2
    with pytest.raises(ValueError, match="scale_by_sm3 .*layout"):
        with warnings.catch_warnings():  # "CSR support is in beta"
            warnings.simplefilter("ignore")
            csr = torch.ones(3, 2).to_sparse_csr()
        tx.update([csr], state)


# ---------------------------------------------------------------------------------------------
# State and memory (§1.4)


@pytest.mark.parametrize("shape, sizes", [((5, 7), [5, 7]), ((2, 3, 4), [2, 3, 4]),
                                          ((9,), [9]), ((), [1]), ((4, 1), [4, 1])])
def test_state_holds_one_accumulator_per_axis_with_broadcast_shapes(shape, sizes):
    state = scale_by_sm3().init([torch.zeros(shape)])
    assert isinstance(state, SM3State) and state.momentum is None
    accumulators = state.mu[0]
    assert isinstance(accumulators, tuple)
    assert [a.numel() for a in accumulators] == sizes
    if len(shape) >= 2:
        for axis, a in enumerate(accumulators):
            assert a.shape == tuple(n if k == axis else 1 for k, n in enumerate(shape))
    with_momentum = scale_by_sm3(b1=0.9).init([torch.zeros(shape)])
    assert [m.shape for m in with_momentum.momentum] == [torch.Size(shape)]


def test_state_flattens_to_readable_per_parameter_keys():
    state = scale_by_sm3(b1=0.5).init({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
    per_param, group = flatten_state(state, 2)
    assert sorted(per_param[0]) == ["momentum", "mu.0", "mu.1"]
    assert sorted(per_param[1]) == ["momentum", "mu.0"]
    assert group == {}
    per_param, group = flatten_state(scale_by_sm3().init([torch.zeros(3, 4)]), 1)
    assert sorted(per_param[0]) == ["mu.0", "mu.1"] and group == {"momentum": None}


# ---------------------------------------------------------------------------------------------
# Contracts shared with the other transforms


def test_flags():
    tx = scale_by_sm3()
    assert tx.leafwise is True and tx.elementwise is False and tx.accepts_sparse is True
    assert tx.terminal is False and tx.needs_hvp is None


SHAPES = [(3, 4), (5,), (), (2, 3, 2)]


def _grads(steps=3, dtype=F64, seed=13):
    per_shape = [random_grads(s, steps, seed=seed + k) for k, s in enumerate(SHAPES)]
    return [[g[t].to(dtype) for g in per_shape] for t in range(steps)]


def test_list_and_dict_trees_give_the_same_values():
    names = ["w", "b", "s", "t"]
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    listed, _ = run(scale_by_sm3(b1=0.5), _grads(), params)
    tx = scale_by_sm3(b1=0.5)
    state = tx.init(dict(zip(names, params)))
    for grads, expected in zip(_grads(), listed):
        out, state = tx.update(dict(zip(names, grads)), state)
        assert list(out) == names
        assert all(torch.equal(a, b) for a, b in zip(out.values(), expected))


@pytest.mark.parametrize("as_raw_grads", [False, True])
def test_update_never_modifies_its_inputs(as_raw_grads):
    tx = scale_by_sm3(b1=0.5, b2=0.9)
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    state = tx.init(params)
    for grads in _grads():
        before = [g.clone() for g in grads]
        _, state = tx.update(grads, state, params, **({"grads": grads} if as_raw_grads else {}))
        assert all(torch.equal(a, b) for a, b in zip(grads, before))
    assert all((p == 0).all() for p in params)


def test_outputs_are_handed_over_not_shared_with_the_state():
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    reference, _ = run(scale_by_sm3(b1=0.5), _grads(4), params)
    tx = scale_by_sm3(b1=0.5)
    state = tx.init(params)
    for grads, expected in zip(_grads(4), reference):
        out, state = tx.update(grads, state)
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
        for o in out:
            o.fill_(float("nan"))


@pytest.mark.parametrize("compiling", [False, True])
def test_empty_leaves_are_fine(monkeypatch, compiling):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    shapes = [(0, 3), (0,), (2, 0, 4)]
    tx = scale_by_sm3(b1=0.5)
    out, _ = tx.update([torch.zeros(s) for s in shapes], tx.init([torch.zeros(s) for s in shapes]))
    assert [o.shape for o in out] == [torch.Size(s) for s in shapes]


def test_empty_tree_is_accepted():
    tx = scale_by_sm3()
    for empty in ([], {}):
        out, state = tx.update(type(empty)(), tx.init(type(empty)()))
        assert out == empty


def test_whole_list_update_equals_per_tensor_updates_bitwise():
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    together, _ = run(scale_by_sm3(b1=0.3), _grads(4), params)
    for i in range(len(SHAPES)):
        alone, _ = run(scale_by_sm3(b1=0.3), [[g[i]] for g in _grads(4)], [params[i]])
        assert all(torch.equal(a[i], b[0]) for a, b in zip(together, alone))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_16bit_params_get_float32_state_and_float32_updates(low):
    tx = scale_by_sm3(b1=0.9)
    params = [torch.zeros(s, dtype=low) for s in SHAPES]
    state = tx.init(params)
    tensors = [a for mu in state.mu for a in mu] + state.momentum
    assert all(t.dtype == torch.float32 for t in tensors)
    for grads in _grads(2, torch.float32):
        out, state = tx.update(grads, state, params)
        assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)


def test_float64_stays_float64():
    out, state = run(scale_by_sm3(b1=0.9), _grads(2), [torch.zeros(s, dtype=F64)
                                                        for s in SHAPES])
    assert all(o.dtype == F64 for o in out[-1])
    assert all(a.dtype == F64 for mu in state.mu for a in mu)


def test_non_finite_gradient_entry_poisons_its_own_entry_first():
    g = torch.ones(2, 3)
    g[0, 1] = float("nan")
    (out,), = run(scale_by_sm3(), [[g]], [torch.zeros(2, 3)])[0]
    assert math.isnan(out[0, 1].item())
    assert torch.isfinite(out.flatten()[[0, 2, 3, 4, 5]]).all()


def test_complex_updates_are_rejected_naming_the_transform():
    tx = scale_by_sm3()
    params = [torch.zeros(3, dtype=torch.complex64)]
    with pytest.raises(ValueError, match="scale_by_sm3 does not support complex"):
        tx.update([torch.ones(3, dtype=torch.complex64)], tx.init(params))


def test_momentum_needs_buffers_in_the_state():
    state = scale_by_sm3().init([torch.zeros(2)])
    with pytest.raises(ValueError, match="momentum"):
        scale_by_sm3(b1=0.9).update([torch.ones(2)], state)


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=1.0), "b1"), (dict(b1=-0.1), "b1"), (dict(b1=float("nan")), "b1"),
    (dict(b2=0.0), "b2"), (dict(b2=1.5), "b2"), (dict(b2=-0.5), "b2"),
    (dict(eps=-1e-8), "eps"), (dict(ema_accumulator_rule="ema"), "ema_accumulator_rule"),
    (dict(b1=lambda count: 0.9), "b1"), (dict(b2="0.9"), "b2"), (dict(eps=True), "eps"),
])
def test_invalid_hyperparameters_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_sm3(**kwargs)


def test_boundary_hyperparameters_are_valid():
    scale_by_sm3(b1=0.0, b2=1.0, eps=0.0, ema_accumulator_rule="running_max")
    scale_by_sm3(b1=0.999, b2=1e-3)
