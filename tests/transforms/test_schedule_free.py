"""schedule_free (ALGORITHMS.md §8.5.2, §10 rows 24 and 36, §11 items 29 and 32): HeavyBall's
closed form, the uniform and t^r-weighted averages, the y/x/z bookkeeping against explicit
recursions, weighting variants, bf16 parameters, the eval/train helpers, contracts, validation."""

from __future__ import annotations

import math

import pytest
import torch

from gradchain.chains.combinators import chain, named_chain, partition
from gradchain.core import apply_updates, flatten_state, leaves, unflatten_state
from gradchain.transforms import (add_decayed_weights, clip_by_global_norm, identity,
                                  scale_by_learning_rate, scale_by_rms, scale_by_sign)
from gradchain.transforms.schedule_free import (ScheduleFreeState, schedule_free,
                                                schedule_free_eval_params, to_eval, to_train)

F64 = torch.float64


def sign_base(lr):
    """sign(u) is the first output of the in-place RMS normaliser (v-hat_1 = u^2)."""
    return chain(scale_by_sign(), scale_by_learning_rate(lr))


def rms_base(lr):
    """A stateful base without momentum, with weight decay evaluated at y."""
    return chain(scale_by_rms(0.99, eps=1e-8, bias_correction=True), add_decayed_weights(0.01),
                 scale_by_learning_rate(lr))


def clone(tree):
    return {k: v.clone() for k, v in tree.items()} if isinstance(tree, dict) \
        else [v.clone() for v in tree]


def close(a, b, rtol=1e-12, atol=1e-14):
    return all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(leaves(a), leaves(b)))


def params_and_grads(trees, kind="list", steps=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = trees.random_tree(gen, kind, spread=False, zeros=False)
    return params, [trees.random_tree(gen, kind) for _ in range(steps)]


def test_heavyball_closed_form_constant_gradient():
    # §11.29: constant gradient 1, lr 0.1, b1 0.9, from 1: c = 1, 1/2, 1/3
    tx = chain(schedule_free(sign_base(0.1), 0.1, b1=0.9))
    params = [torch.ones(3, dtype=F64)]
    state = tx.init(params)
    ys = []
    for _ in range(3):
        out, state = tx.update([torch.ones(3, dtype=F64)], state, params)
        apply_updates(params, out)
        ys.append(params[0][0].item())
    assert ys == pytest.approx([0.9, 0.845, 0.79], abs=1e-14)
    assert state[0].z[0][0].item() == pytest.approx(0.7, abs=1e-14)
    x = schedule_free_eval_params(state, params, b1=0.9)  # a chain's state holds the wrapper's
    assert x[0][0].item() == pytest.approx(0.8, abs=1e-14)  # mean(z_2, z_3, z_4)


@pytest.mark.parametrize("r", [0.0, 1.0, 2.5])
def test_constant_lr_average_is_the_t_power_r_weighted_mean_of_z(trees, r):
    # §11.32: constant lr, p = 2 => c_{t+1} = t^r / sum_{i<=t} i^r; r = 0: the plain mean
    lr, steps = 0.05, 20
    params, grads = params_and_grads(trees, steps=steps)
    tx = schedule_free(rms_base(lr), lr, b1=0.9, weight_lr_power=2.0, r=r)
    state = tx.init(params)
    zs = []
    for g in grads:
        out, state = tx.update(clone(g), state, params)
        apply_updates(params, out)
        zs.append([z.clone() for z in state.z])
    weights = [float(t) ** r for t in range(1, steps + 1)]
    expected = [sum(w * z[i] for w, z in zip(weights, zs)) / sum(weights)
                for i in range(len(params))]
    assert close(schedule_free_eval_params(state, params, b1=0.9), expected)
    assert state.weight_sum == pytest.approx(lr ** 2 * sum(weights), rel=1e-14)
    if r == 0.0:
        mean = [torch.stack([z[i] for z in zs]).mean(0) for i in range(len(params))]
        assert close(expected, mean)


def decaying(count):
    return 0.1 / (1.0 + 0.3 * count)


def warmup(count):
    return 0.1 * min((count + 1) / 4, 1.0)


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("lr, weighting, r, p", [
    (decaying, "current", 0.0, 2.0),
    (decaying, "max", 1.0, 2.0),
    (warmup, "current", 0.5, 1.0),
    (lambda count: 0.05 * (1.2 + math.cos(count)), "max", 0.0, 3.0),
], ids=["decay-current", "decay-max-r1", "warmup-p1", "cosine-max-p3"])
def test_y_x_z_bookkeeping_against_explicit_recursions(trees, kind, lr, weighting, r, p):
    b1 = 0.9
    params, grads = params_and_grads(trees, kind)
    tx = schedule_free(rms_base(lr), lr, b1=b1, weight_lr_power=p, r=r, weighting=weighting)
    reference_base = rms_base(lr)
    state, base_state = tx.init(params), reference_base.init(params)
    x = [t.clone() for t in leaves(params)]
    z = [t.clone() for t in leaves(params)]
    weight_sum, lr_max = 0.0, 0.0
    for step, g in enumerate(grads):
        b, base_state = reference_base.update(clone(g), base_state, params)  # at y
        out, state = tx.update(clone(g), state, params)
        assert type(out) is type(g)
        if kind == "dict":
            assert list(out) == list(g)
        lr_max = max(lr_max, lr(step))
        w = (step + 1) ** r * (lr(step) if weighting == "current" else lr_max) ** p
        weight_sum += w
        c = w / weight_sum
        z = [zi + bi for zi, bi in zip(z, leaves(b))]
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z)]
        apply_updates(params, out)
        assert close(state.z, z), f"z, step {step}"
        assert close(params, [(1 - b1) * zi + b1 * xi for xi, zi in zip(x, z)]), f"y, step {step}"
        assert close(schedule_free_eval_params(state, params, b1), x), f"x, step {step}"
    y = clone(params)
    to_eval(state, params, b1)
    assert close(params, x)
    to_train(state, params, b1)
    assert close(params, y)


def test_max_and_current_weighting_differ_under_a_decreasing_lr(trees):
    params, grads = params_and_grads(trees, steps=4)
    txs = {w: schedule_free(rms_base(decaying), decaying, weighting=w) for w in ("current", "max")}
    states = {w: tx.init(params) for w, tx in txs.items()}
    outs = {w: [] for w in txs}
    for g in grads:
        for w, tx in txs.items():
            out, states[w] = tx.update(clone(g), states[w], params)
            outs[w].append(out)
    assert close(outs["current"][0], outs["max"][0])  # c_2 = 1 for both
    assert not close(outs["current"][1], outs["max"][1], rtol=1e-6, atol=0)
    assert states["max"].lr_max == states["current"].lr_max == decaying(0)
    assert states["max"].weight_sum == pytest.approx(4 * decaying(0) ** 2, rel=1e-14)


def test_max_and_current_weighting_agree_under_a_warm_up(trees):
    params, grads = params_and_grads(trees, steps=8)
    txs = [schedule_free(rms_base(warmup), warmup, weighting=w) for w in ("current", "max")]
    states = [tx.init(params) for tx in txs]
    for g in grads:
        outs = []
        for i, tx in enumerate(txs):
            out, states[i] = tx.update(clone(g), states[i], params)
            outs.append(out)
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        apply_updates(params, outs[0])


@pytest.mark.parametrize("weighting", ["current", "max"])
def test_zero_lr_on_the_first_call_gives_exactly_zero_and_leaves_z(weighting):
    lr = lambda count: 0.03 * count  # noqa: E731
    tx = schedule_free(sign_base(lr), lr, b1=0.9, weighting=weighting)
    params = [torch.tensor([1.0, -2.0, 0.5], dtype=F64)]
    start = clone(params)
    out, state = tx.update([torch.tensor([1.0, -1.0, 3.0], dtype=F64)], tx.init(params), params)
    assert torch.equal(out[0], torch.zeros(3, dtype=F64))
    assert state.weight_sum == 0.0 and torch.equal(state.z[0], start[0])
    apply_updates(params, out)
    assert torch.equal(params[0], start[0])
    out, state = tx.update([torch.tensor([1.0, -1.0, 3.0], dtype=F64)], state, params)
    # c_2 = 1 (the first nonzero weight), z = y: o = b = -lr(1) sign(g)
    assert close(out, [-0.03 * torch.tensor([1.0, -1.0, 1.0], dtype=F64)])


def test_c_is_zero_while_the_weights_sum_to_zero():
    # the weights' learning rate is 0 on the first call while the base's is not (a mismatch the
    # docs warn against, which makes c visible): c_2 = 0 => o = (1 - b1) b
    tx = schedule_free(sign_base(0.1), lambda count: 0.1 * count, b1=0.9)
    params = [torch.zeros(3, dtype=F64)]
    out, state = tx.update([torch.tensor([2.0, -1.0, 0.0], dtype=F64)], tx.init(params), params)
    assert close(out, [torch.tensor([-0.01, 0.01, 0.0], dtype=F64)])
    assert state.weight_sum == 0.0


def test_bf16_params_z_moves_in_float32():
    # §10 row 36: HeavyBall 0.8 froze z for bf16 parameters (y ended at ~0.89)
    tx = chain(schedule_free(sign_base(0.1), 0.1, b1=0.9))
    params = [torch.ones(4, dtype=torch.bfloat16)]
    state = tx.init(params)
    assert state[0].z[0].dtype == torch.float32
    for _ in range(3):
        out, state = tx.update([torch.ones(4, dtype=torch.bfloat16)], state, params)
        assert out[0].dtype == torch.float32 and out[0].isfinite().all()
        apply_updates(params, out)
    assert params[0].dtype == torch.bfloat16
    assert torch.allclose(state[0].z[0], torch.full((4,), 0.7), atol=1e-6)
    assert (params[0].float() - 0.79).abs().max() < 2 ** -8  # one bf16 ulp
    x = schedule_free_eval_params(state, params, b1=0.9)
    assert x[0].dtype == torch.bfloat16 and (x[0].float() - 0.8).abs().max() < 2 ** -7
    y = params[0].clone()
    to_eval(state, params, b1=0.9)
    assert params[0].dtype == torch.bfloat16 and torch.equal(params[0], x[0])
    to_train(state, params, b1=0.9)
    assert (params[0].float() - y.float()).abs().max() <= 2 ** -8


def test_b1_zero_keeps_y_equal_to_z(trees):
    params, grads = params_and_grads(trees, steps=3)
    tx = schedule_free(rms_base(0.1), 0.1, b1=0.0)
    state = tx.init(params)
    for g in grads:
        out, state = tx.update(clone(g), state, params)
        apply_updates(params, out)
        assert close(params, state.z)


def test_output_aliases_neither_z_nor_params_nor_the_gradient():
    tx = schedule_free(identity(), 0.1)  # the base hands the raw gradient through
    params = [torch.randn(3, 2, dtype=F64), torch.randn(4, dtype=F64)]
    g = [torch.randn(3, 2, dtype=F64), torch.randn(4, dtype=F64)]
    g_before = clone(g)
    state = tx.init(params)
    out, state = tx.update(g, state, params)
    assert all(torch.equal(a, b) for a, b in zip(g, g_before))
    z_before = [z.clone() for z in state.z]
    for o, z, p, gi in zip(out, state.z, params, g):
        assert o.data_ptr() not in (z.data_ptr(), p.data_ptr(), gi.data_ptr())
        o.fill_(123.0)
    assert all(torch.equal(a, b) for a, b in zip(state.z, z_before))


def test_init_copies_the_params():
    params = {"w": torch.ones(2, 2, dtype=F64)}
    state = schedule_free(sign_base(0.1), 0.1).init(params)
    params["w"].add_(1.0)
    assert torch.equal(state.z[0], torch.ones(2, 2, dtype=F64))


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_empty_params_advance_the_count(kind):
    tx = schedule_free(rms_base(0.1), 0.1)
    empty = {} if kind == "dict" else []
    state = tx.init(empty)
    for _ in range(2):
        out, state = tx.update(empty, state, empty)
    assert out == empty and state.count == 2


def test_unscaled_times_keep_is_the_update_with_the_same_state():
    tx = schedule_free(rms_base(0.1), 0.1, b1=0.9)
    params_a, params_b = [torch.linspace(-1, 1, 5, dtype=F64)], [torch.linspace(-1, 1, 5,
                                                                                dtype=F64)]
    state_a, state_b = tx.init(params_a), tx.init(params_b)
    for step in range(4):
        g = [torch.linspace(0.5, -2, 5, dtype=F64) * (step + 1)]
        out, state_a = tx.update(clone(g), state_a, params_a)
        unscaled, state_b, keep, decay = tx.unscaled(clone(g), state_b, params_b)
        assert decay == 0.0
        torch.testing.assert_close(out[0], keep * unscaled[0], rtol=1e-14, atol=0)
        apply_updates(params_a, out)
        params_b[0].add_(unscaled[0], alpha=keep)
        torch.testing.assert_close(state_a.z[0], state_b.z[0], rtol=0, atol=0)
        assert float(state_a.weight_sum) == float(state_b.weight_sum)


def test_each_state_gets_its_own_averaging_weights_whatever_the_call_before():
    """One transform, two states at the same count but with different weight sums, updated
    alternately: every output equals that of a fresh transform (the eager step's scalars are
    keyed by the state they come from)."""
    lr = 0.1

    def fresh_update(state, g, params):
        return schedule_free(sign_base(lr), lr, b1=0.9).update(g, state, params)

    tx = schedule_free(sign_base(lr), lr, b1=0.9)
    params = [torch.ones(3, dtype=F64)]
    first = tx.init(params)
    second = first._replace(weight_sum=torch.tensor(5.0, dtype=F64),
                            z=[z.clone() for z in first.z])
    g = [torch.tensor([1.0, -2.0, 3.0], dtype=F64)]
    for state in (first, second, first, second):
        z_before = [z.clone() for z in state.z]
        out, new = tx.update(clone(g), state, params)
        state.z[0].copy_(z_before[0])  # undo the in-place z step for the reference
        expected, _ = fresh_update(state, clone(g), params)
        state.z[0].copy_(z_before[0])
        torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
    assert float(new.weight_sum) != float(tx.update(clone(g), first, params)[1].weight_sum)


def test_flags_follow_the_base():
    tx = schedule_free(sign_base(0.1), 0.1)
    assert tx.terminal and tx.leafwise and tx.elementwise and not tx.accepts_sparse
    tx = schedule_free(chain(clip_by_global_norm(1.0), scale_by_learning_rate(0.1)), 0.1)
    assert tx.terminal and not tx.leafwise and not tx.elementwise


def test_flatten_and_unflatten_state_round_trip(trees):
    def make():
        base = named_chain(("rms", scale_by_rms(0.99)), ("lr", scale_by_learning_rate(0.1)))
        return named_chain(("sf", schedule_free(base, 0.1)))

    params, grads = params_and_grads(trees, "dict", steps=4)
    tx = make()
    state = tx.init(params)
    for g in grads[:3]:
        out, state = tx.update(clone(g), state, params)
        apply_updates(params, out)
    n = len(params)
    per_param, group = flatten_state(state, n)
    assert {"sf.z", "sf.base.rms.nu"} <= set(per_param[0])
    assert {"sf.count", "sf.weight_sum", "sf.lr_max", "sf.base.rms.count"} <= set(group)
    restored = unflatten_state(make().init(clone(params)), per_param, group)
    sf, back = state["sf"], restored["sf"]
    assert isinstance(back, ScheduleFreeState)
    assert (back.count, back.weight_sum, back.lr_max) == (sf.count, sf.weight_sum, sf.lr_max)
    assert all(torch.equal(a, b) for a, b in zip(back.z, sf.z))
    out_a, _ = tx.update(clone(grads[3]), state, params)
    out_b, _ = tx.update(clone(grads[3]), restored, params)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_eval_helpers_skip_parameters_outside_the_wrapper():
    tx = partition({"sf": schedule_free(sign_base(0.1), 0.1), "sgd": scale_by_learning_rate(0.1)},
                   {"a": "sf", "b": "sgd"})
    params = {"a": torch.ones(2, dtype=F64), "b": torch.ones(3, dtype=F64)}
    state = tx.init(params)
    for _ in range(3):
        out, state = tx.update({k: torch.ones_like(v) for k, v in params.items()}, state, params)
        apply_updates(params, out)
    y = clone(params)
    x = schedule_free_eval_params(state, params, b1=0.9)
    assert close([x["a"]], [torch.full((2,), 0.8, dtype=F64)])
    assert torch.equal(x["b"], y["b"]) and x["b"] is not params["b"]
    to_eval(state, params, b1=0.9)
    assert torch.equal(params["a"], x["a"]) and torch.equal(params["b"], y["b"])
    to_train(state, params, b1=0.9)
    assert close(params, y)


def test_eval_helpers_write_parameters_that_require_grad():
    p = torch.nn.Parameter(torch.ones(2))
    tx = schedule_free(scale_by_learning_rate(1.0), 1.0, b1=0.5)
    _, state = tx.update([torch.ones(2)], tx.init([p]), [p])
    to_eval(state, [p], b1=0.5)  # y = 1, z = 0: x = 2y - z
    assert torch.equal(p.detach(), torch.full((2,), 2.0)) and p.requires_grad


@pytest.mark.parametrize("make, match", [
    (lambda: schedule_free(schedule_free(sign_base(0.1), 0.1), 0.1), "must not be terminal"),
    (lambda: schedule_free(sign_base(0.1), 0.1, b1=1.0), "b1"),
    (lambda: schedule_free(sign_base(0.1), 0.1, b1=-0.1), "b1"),
    (lambda: schedule_free(sign_base(0.1), 0.1, b1=math.nan), "b1"),
    (lambda: schedule_free(sign_base(0.1), 0.1, b1=lambda c: 0.9), "b1"),
    (lambda: schedule_free(sign_base(0.1), 0.1, weight_lr_power=-1.0), "weight_lr_power"),
    (lambda: schedule_free(sign_base(0.1), 0.1, r=-0.5), "r must be"),
    (lambda: schedule_free(sign_base(0.1), 0.1, weighting="mean"), "weighting"),
    (lambda: schedule_free(sign_base(0.1), -0.1), "learning_rate"),
    (lambda: chain(schedule_free(sign_base(0.1), 0.1), scale_by_sign()), "terminal"),
], ids=["terminal-base", "b1=1", "b1<0", "b1-nan", "b1-schedule", "p<0", "r<0", "weighting",
        "lr<0", "not-last"])
def test_invalid_configuration_is_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_update_without_params_is_refused():
    tx = schedule_free(sign_base(0.1), 0.1)
    params = [torch.ones(2)]
    with pytest.raises(ValueError, match="schedule_free needs the parameters"):
        tx.update([torch.ones(2)], tx.init(params))


def test_negative_scheduled_lr_is_refused():
    lr = lambda count: -0.1  # noqa: E731
    tx = schedule_free(sign_base(0.1), lr)
    params = [torch.ones(2)]
    with pytest.raises(ValueError, match="learning_rate"):
        tx.update([torch.ones(2)], tx.init(params), params)


@pytest.mark.parametrize("helper", [schedule_free_eval_params, to_eval, to_train])
@pytest.mark.parametrize("b1, match", [(0.0, "b1 = 0"), (1.0, "b1"), (-0.5, "b1")])
def test_eval_helpers_refuse_b1_outside_0_1(helper, b1, match):
    tx = schedule_free(sign_base(0.1), 0.1, b1=0.0)
    params = [torch.ones(2)]
    state = tx.init(params)
    with pytest.raises(ValueError, match=match):
        helper(state, params, b1)
    assert torch.equal(params[0], torch.ones(2))


def test_eval_helpers_need_one_matching_schedule_free_state():
    tx = schedule_free(sign_base(0.1), 0.1)
    params = [torch.ones(2)]
    state = tx.init(params)
    with pytest.raises(ValueError, match="found 0"):
        schedule_free_eval_params(state.base, params, 0.9)
    with pytest.raises(ValueError, match="found 2"):
        schedule_free_eval_params((state, state), params, 0.9)
    with pytest.raises(ValueError, match="z for 1 parameters"):
        to_eval(state, params + [torch.ones(1)], 0.9)


def test_sparse_gradients_are_refused_with_the_transform_name():
    tx = schedule_free(scale_by_learning_rate(0.1), 0.1)
    params = [torch.zeros(3)]
    g = [torch.zeros(3).to_sparse()]
    with pytest.raises(ValueError, match="schedule_free"):
        tx.update(g, tx.init(params), params)
