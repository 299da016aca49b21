"""scale_by_abs_hessian_diag (ALGORITHMS.md §2, §11 item 9): the HVP schedule, exact values on
diagonal Hessians, the estimator, the probe generator, missing and non-finite HVPs, contracts."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch

from gradchain.chains.combinators import chain
from gradchain.core import flatten_state, needs_hvp, unflatten_state
from gradchain.transforms import curvature
from gradchain.transforms.basic import scale
from gradchain.transforms.curvature import is_hvp_step, scale_by_abs_hessian_diag

F64 = torch.float64


def spd(n: int, seed: int = 0) -> torch.Tensor:
    """A dense symmetric positive-definite matrix (non-diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=F64)
    return a @ a.T + 0.5 * torch.eye(n, dtype=F64)


class RecordingHvp:
    """hvp(v) = A v for one vector leaf (or a joint A over a list of leaves); records the probes
    and the products it returns."""

    def __init__(self, a: torch.Tensor, shapes=None):
        self.a, self.shapes = a, shapes
        self.probes: list[list[torch.Tensor]] = []
        self.products: list[list[torch.Tensor]] = []

    def __call__(self, v):
        leaves = list(v.values()) if isinstance(v, dict) else list(v)
        self.probes.append([x.clone() for x in leaves])
        flat = self.a @ torch.cat([x.reshape(-1) for x in leaves]).to(self.a.dtype)
        out, start = [], 0
        for x in leaves:
            out.append(flat[start:start + x.numel()].reshape(x.shape).to(x.dtype))
            start += x.numel()
        self.products.append([o.clone() for o in out])
        return dict(zip(v.keys(), out)) if isinstance(v, dict) else out


# ---------------------------------------------------------------------------------------------
# Schedule (§2.5, §11 item 9)

def test_default_schedule_is_the_first_twenty_then_every_tenth():
    steps = {t for t in range(1, 101) if is_hvp_step(t, update_d_every=10, d_warmup=20)}
    assert steps == set(range(1, 21)) | {30, 40, 50, 60, 70, 80, 90, 100}


def test_schedule_with_one_warmup_step_and_period_three():
    steps = {t for t in range(1, 30) if is_hvp_step(t, update_d_every=3, d_warmup=1)}
    assert steps == {1, 4, 7, 10, 13, 16, 19, 22, 25, 28}


@pytest.mark.parametrize("every,warmup", [(10, 20), (3, 1), (1, 1), (4, 6)])
def test_needs_hvp_follows_the_schedule_and_hvp_is_called_exactly_then(every, warmup):
    tx = scale_by_abs_hessian_diag(update_d_every=every, d_warmup=warmup)
    hvp = RecordingHvp(torch.eye(2, dtype=F64))
    state = tx.init([torch.zeros(2, dtype=F64)])
    asked, called = [], []
    for t in range(1, 41):
        asked.append(needs_hvp(tx, state))
        before = len(hvp.probes)
        extras = {"hvp": hvp} if asked[-1] else {}
        _, state = tx.update([torch.ones(2, dtype=F64)], state, **extras)
        called.append(len(hvp.probes) > before)
        assert state.count == t
    expected = [t <= warmup or (t - warmup) % every == 0 for t in range(1, 41)]
    assert asked == expected and called == expected
    assert state.hvp_count == sum(expected)


# ---------------------------------------------------------------------------------------------
# Exact values

@pytest.mark.parametrize("b2", [0.0, 0.5, 0.999])
def test_diagonal_hessian_gives_the_squared_diagonal_after_the_first_estimate(b2):
    a = torch.tensor([4.0, -0.5, 1e-3, 300.0], dtype=F64)
    tx = scale_by_abs_hessian_diag(b2=b2, eps=0.0)
    u = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)
    out, state = tx.update([u.clone()], tx.init([torch.zeros(4, dtype=F64)]),
                           hvp=lambda v: [a * v[0]])
    torch.testing.assert_close(state.d[0] / (1 - b2), a ** 2, rtol=1e-15, atol=0)
    torch.testing.assert_close(out[0], u / a.abs(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("b2", [0.0, 0.9, 0.999])
def test_first_estimate_is_bias_corrected_to_the_squared_product_for_any_b2(b2):
    a = spd(5, seed=1)
    hvp = RecordingHvp(a)
    tx = scale_by_abs_hessian_diag(b2=b2, eps=1e-3)
    u = torch.linspace(-1, 1, 5, dtype=F64)
    out, state = tx.update([u.clone()], tx.init([torch.zeros(5, dtype=F64)]), hvp=hvp)
    h = a @ hvp.probes[0][0]
    torch.testing.assert_close(hvp.products[0][0], h)
    torch.testing.assert_close(out[0], u / (h.abs() + 1e-3), rtol=1e-14, atol=0)
    assert state.hvp_count == 1


def test_without_bias_correction_the_denominator_is_the_raw_average():
    a = torch.tensor([2.0, 3.0], dtype=F64)
    tx = scale_by_abs_hessian_diag(b2=0.75, eps=0.0, bias_correction=False)
    out, _ = tx.update([torch.ones(2, dtype=F64)], tx.init([torch.zeros(2, dtype=F64)]),
                       hvp=lambda v: [a * v[0]])
    torch.testing.assert_close(out[0], 1 / (0.5 * a), rtol=1e-15, atol=0)  # sqrt(0.25 a^2)


def test_estimates_follow_the_ema_recursion_with_the_probes_drawn():
    a = spd(4, seed=2)
    hvp = RecordingHvp(a)
    b2, eps = 0.8, 1e-2
    tx = scale_by_abs_hessian_diag(b2=b2, eps=eps, update_d_every=2, d_warmup=3)
    state = tx.init([torch.zeros(4, dtype=F64)])
    gen = torch.Generator().manual_seed(5)
    d, k = torch.zeros(4, dtype=F64), 0
    for t in range(1, 12):
        u = torch.randn(4, generator=gen, dtype=F64)
        out, state = tx.update([u.clone()], state, hvp=hvp)
        if t <= 3 or (t - 3) % 2 == 0:
            h = a @ hvp.probes[-1][0]
            d, k = b2 * d + (1 - b2) * h ** 2, k + 1
        expected = u / ((d / (1 - b2 ** k)).sqrt() + eps)
        torch.testing.assert_close(out[0], expected, rtol=1e-13, atol=0, msg=f"step {t}")
    assert k == 7 and state.hvp_count == 7


def test_d_is_unchanged_between_estimates():
    tx = scale_by_abs_hessian_diag(update_d_every=10, d_warmup=2)
    a = spd(3)
    state = tx.init([torch.zeros(3, dtype=F64)])
    for _ in range(2):
        _, state = tx.update([torch.ones(3, dtype=F64)], state, hvp=RecordingHvp(a))
    saved = state.d[0].clone()
    outs = []
    for _ in range(9):  # steps 3..11 make no estimate: no hvp needed
        out, state = tx.update([torch.ones(3, dtype=F64)], state)
        outs.append(out[0])
        assert torch.equal(state.d[0], saved) and state.hvp_count == 2
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_estimator_averages_to_the_diagonal_of_h_squared():
    # E[(Hz)_i^2] = (H^2)_ii; with b2 -> arithmetic-mean-like averaging over many probes
    a = spd(6, seed=3)
    tx = scale_by_abs_hessian_diag(b2=0.999, eps=0.0, update_d_every=1, d_warmup=1)
    state = tx.init([torch.zeros(6, dtype=F64)])
    for _ in range(3000):
        _, state = tx.update([torch.ones(6, dtype=F64)], state, hvp=RecordingHvp(a))
    estimate = state.d[0] / (1 - 0.999 ** 3000)
    torch.testing.assert_close(estimate, torch.diag(a @ a), rtol=0.1, atol=0)


def test_hvp_covers_all_leaves_jointly_with_one_probe():
    shapes = [(2, 2), (3,), ()]
    a = spd(8, seed=4)
    hvp = RecordingHvp(a)
    tx = scale_by_abs_hessian_diag(b2=0.0, eps=0.0)
    u = [torch.ones(s, dtype=F64) for s in shapes]
    out, _ = tx.update(u, tx.init([torch.zeros(s, dtype=F64) for s in shapes]), hvp=hvp)
    z = torch.cat([p.reshape(-1) for p in hvp.probes[0]])
    h = (a @ z).abs()
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), 1 / h, rtol=1e-14,
                               atol=0)


# ---------------------------------------------------------------------------------------------
# Probes and their generator

def test_probes_are_rademacher_shaped_and_typed_like_the_updates():
    tx = scale_by_abs_hessian_diag()
    hvp = RecordingHvp(torch.eye(1000 + 12 + 1, dtype=F64))
    shapes = [(10, 100), (12,), ()]
    dtypes = [torch.float32, F64, torch.float32]
    u = [torch.ones(s, dtype=d) for s, d in zip(shapes, dtypes)]
    tx.update(u, tx.init([torch.zeros_like(x) for x in u]), hvp=hvp)
    z = hvp.probes[0]
    assert [p.shape for p in z] == [torch.Size(s) for s in shapes]
    assert [p.dtype for p in z] == dtypes
    flat = torch.cat([p.reshape(-1).double() for p in z])
    assert set(flat.unique().tolist()) == {-1.0, 1.0}
    assert abs(flat.mean().item()) < 0.1


def test_hvp_receives_a_dict_with_the_update_names():
    seen = []

    def hvp(v):
        seen.append(list(v))
        return {k: x.clone() for k, x in v.items()}

    tx = scale_by_abs_hessian_diag()
    u = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    out, _ = tx.update(u, tx.init(u), hvp=hvp)
    assert seen == [["w", "b"]] and list(out) == ["w", "b"]


def probes_of(seed: int, steps: int = 3) -> list[torch.Tensor]:
    tx = scale_by_abs_hessian_diag(seed=seed)
    hvp = RecordingHvp(torch.eye(64, dtype=F64))
    state = tx.init([torch.zeros(64, dtype=F64)])
    for _ in range(steps):
        _, state = tx.update([torch.ones(64, dtype=F64)], state, hvp=hvp)
    return [p[0] for p in hvp.probes]


def test_probes_are_fresh_every_step_and_reproducible_from_the_seed():
    first, again, other = probes_of(0), probes_of(0), probes_of(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert not torch.equal(first[0], other[0])


def test_update_does_not_touch_the_global_random_stream():
    tx = scale_by_abs_hessian_diag(update_d_every=1)
    state = tx.init([torch.zeros(50)])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in range(3):
        _, state = tx.update([torch.ones(50)], state, hvp=lambda v: v)
    assert torch.equal(torch.get_rng_state(), before)


def test_generator_state_round_trips_through_a_checkpoint():
    shapes = [(3, 2), (4,)]
    a = spd(10, seed=5)
    tx = scale_by_abs_hessian_diag(update_d_every=1)
    params = [torch.zeros(s, dtype=F64) for s in shapes]
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update([torch.ones(s, dtype=F64) for s in shapes], state,
                             hvp=RecordingHvp(a))
    per_param, group = flatten_state(state, len(params))
    assert "rng_state" in group and group["rng_state"].dtype == torch.uint8
    restored = unflatten_state(tx.init(params), per_param, group)
    assert restored.count == 3 and restored.hvp_count == 3
    runs = []
    for s in (state, restored):
        hvp = RecordingHvp(a)
        outs = []
        for _ in range(3):
            out, s = tx.update([torch.ones(sh, dtype=F64) for sh in shapes], s, hvp=hvp)
            outs.append(out)
        runs.append((hvp.probes, outs))
    for p, q in zip(runs[0][0], runs[1][0]):
        assert all(torch.equal(x, y) for x, y in zip(p, q))
    for p, q in zip(runs[0][1], runs[1][1]):
        assert all(torch.equal(x, y) for x, y in zip(p, q))


# ---------------------------------------------------------------------------------------------
# Missing and non-finite products

def snapshot(state):
    return (state.count, state.hvp_count, [d.clone() for d in state.d], state.rng_state.clone())


def same(state, snap) -> bool:
    count, k, d, rng = snap
    return (state.count == count and state.hvp_count == k
            and all(torch.equal(x, y) for x, y in zip(state.d, d))
            and torch.equal(state.rng_state, rng))


def test_missing_hvp_raises_before_changing_anything():
    tx = scale_by_abs_hessian_diag(update_d_every=2, d_warmup=1)
    state = tx.init([torch.zeros(3)])
    _, state = tx.update([torch.ones(3)], state, hvp=lambda v: [2 * v[0]])  # t = 1
    _, state = tx.update([torch.ones(3)], state)                            # t = 2: none
    snap = snapshot(state)
    with pytest.raises(ValueError, match="'hvp'") as info:
        tx.update([torch.ones(3)], state)                                   # t = 3
    message = str(info.value)
    assert "hvp=" in message and "create_graph=True" in message and "closure" in message
    assert same(state, snap)
    # and the step still works once the product is given
    _, after = tx.update([torch.ones(3)], state, hvp=lambda v: [2 * v[0]])
    assert after.hvp_count == 2


def test_a_malformed_product_raises_before_changing_anything():
    tx = scale_by_abs_hessian_diag()
    state = tx.init([torch.zeros(3), torch.zeros(2)])
    snap = snapshot(state)
    with pytest.raises(ValueError, match="shape"):
        tx.update([torch.ones(3), torch.ones(2)], state, hvp=lambda v: [v[0], v[0]])
    with pytest.raises(ValueError, match="2 parameters"):
        tx.update([torch.ones(3), torch.ones(2)], state, hvp=lambda v: [v[0]])
    assert same(state, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_product_is_skipped_with_one_warning(bad):
    # 1e30 is finite but its square overflows float32
    tx = scale_by_abs_hessian_diag(b2=0.5, eps=0.0, update_d_every=1)
    state = tx.init([torch.zeros(2)])
    good = lambda v: [3.0 * v[0]]  # noqa: E731

    def poisoned(v):
        return [v[0] * torch.tensor([1.0, bad])]

    out1, state = tx.update([torch.ones(2)], state, hvp=good)
    d, k = state.d[0].clone(), state.hvp_count
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out2, state = tx.update([torch.ones(2)], state, hvp=poisoned)
    assert torch.equal(state.d[0], d) and state.hvp_count == k and state.count == 2
    assert torch.equal(out2[0], out1[0]) and torch.isfinite(out2[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, state = tx.update([torch.ones(2)], state, hvp=poisoned)  # no second warning
    assert state.hvp_count == k
    _, state = tx.update([torch.ones(2)], state, hvp=good)
    assert state.hvp_count == k + 1


def test_output_is_zero_until_a_first_finite_estimate():
    tx = scale_by_abs_hessian_diag(update_d_every=1)
    state = tx.init([torch.zeros(2)])
    with pytest.warns(RuntimeWarning):
        out, state = tx.update([torch.ones(2)], state, hvp=lambda v: [v[0] * float("nan")])
    assert torch.equal(out[0], torch.zeros(2)) and state.hvp_count == 0


# ---------------------------------------------------------------------------------------------
# Contracts

@pytest.mark.parametrize("empty", [[], {}], ids=["list", "dict"])
def test_empty_tree_advances_count_without_an_hvp(empty):
    tx = scale_by_abs_hessian_diag()
    state = tx.init(type(empty)())
    for k in range(3):
        out, state = tx.update(type(empty)(), state)
        assert type(out) is type(empty) and len(out) == 0 and state.count == k + 1


def test_list_and_dict_trees_give_the_same_values():
    a = spd(7, seed=6)
    shapes = [(2, 3), (1,)]
    names = ["w", "b"]
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(4)]
    tx = scale_by_abs_hessian_diag(update_d_every=2, d_warmup=1)
    ls = tx.init([torch.zeros(s, dtype=F64) for s in shapes])
    ds = tx.init({n: torch.zeros(s, dtype=F64) for n, s in zip(names, shapes)})
    for g in grads:
        lo, ls = tx.update([x.clone() for x in g], ls, hvp=RecordingHvp(a))
        do, ds = tx.update(dict(zip(names, [x.clone() for x in g])), ds, hvp=RecordingHvp(a))
        assert type(do) is dict and list(do) == names
        assert all(torch.equal(x, y) for x, y in zip(lo, do.values()))


def test_inputs_are_unmodified_and_outputs_are_not_state():
    tx = scale_by_abs_hessian_diag(update_d_every=1)
    u = [torch.tensor([1.0, -2.0])]
    state = tx.init(u)
    out, state = tx.update(u, state, hvp=lambda v: [3 * v[0]])
    assert torch.equal(u[0], torch.tensor([1.0, -2.0]))
    d = state.d[0].clone()
    out[0].fill_(float("nan"))
    assert torch.equal(state.d[0], d)


def test_raw_gradient_is_not_overwritten_inside_a_chain():
    tx = chain(scale_by_abs_hessian_diag(), scale(2.0))
    g = [torch.tensor([1.0, -2.0])]
    tx.update(g, tx.init(g), hvp=lambda v: [3 * v[0]])
    assert torch.equal(g[0], torch.tensor([1.0, -2.0]))


def test_sixteen_bit_parameters_keep_float32_curvature():
    tx = chain(scale_by_abs_hessian_diag(eps=0.0))
    p = [torch.zeros(3, dtype=torch.bfloat16)]
    state = tx.init(p)
    assert state[0].d[0].dtype == torch.float32
    out, state = tx.update([torch.full((3,), 2.0, dtype=torch.bfloat16)], state, p,
                           hvp=lambda v: [4.0 * v[0]])
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((3,), 0.5), rtol=1e-6, atol=0)


def test_flags_and_chain_propagation():
    tx = scale_by_abs_hessian_diag()
    assert not tx.leafwise and not tx.elementwise and not tx.terminal
    chained = chain(scale(1.0), tx)
    assert not chained.leafwise
    state = chained.init([torch.zeros(1)])
    assert needs_hvp(chained, state)


# ---------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize("kwargs,name", [
    ({"b2": 1.0}, "b2"), ({"b2": -0.1}, "b2"), ({"b2": lambda c: 0.9}, "b2"),
    ({"eps": -1e-4}, "eps"), ({"eps": float("nan")}, "eps"),
    ({"update_d_every": 0}, "update_d_every"), ({"update_d_every": 2.0}, "update_d_every"),
    ({"update_d_every": True}, "update_d_every"), ({"d_warmup": 0}, "d_warmup"),
    ({"d_warmup": -3}, "d_warmup"), ({"d_warmup": None}, "d_warmup"), ({"seed": 0.5}, "seed"),
])
def test_rejects_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_abs_hessian_diag(**kwargs)


def test_curvature_docstring_examples_run():
    result = doctest.testmod(curvature)
    assert result.attempted > 0 and result.failed == 0
