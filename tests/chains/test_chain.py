"""chain and named_chain: composition, the ``grads`` extra, input safety, structure checks,
terminal members and 16-bit widening."""

from __future__ import annotations

import math

import pytest
import torch

from gradchain.chains import chain, masked, named_chain, partition
from gradchain.core import EmptyState, GradientTransformation, add_scaled_, apply_updates, leaves
from gradchain.transforms import sm3 as sm3_module
from gradchain.transforms import (
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    identity,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_sign,
    scale_by_sm3,
    trace,
)
from chain_helpers import clone as _clone, grads as _grads, params as _params
from chain_helpers import state_tensors as _state_tensors


def _spy(log: list, leafwise: bool = True) -> GradientTransformation:
    """Passes the updates through and records what it was handed (cloned values)."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extras):
        log.append({
            "updates": [u.clone() for u in leaves(updates)],
            "dtypes": [u.dtype for u in leaves(updates)],
            "grads": None if extras.get("grads") is None
            else [g.clone() for g in leaves(extras["grads"])],
            "grads_dtypes": None if extras.get("grads") is None
            else [g.dtype for g in leaves(extras["grads"])],
            "extras": dict(extras),
            "params": params,
        })
        return updates, state

    return GradientTransformation(init, update, leafwise=leafwise)


def _terminal() -> GradientTransformation:
    return GradientTransformation(lambda params: EmptyState(),
                                  lambda updates, state, params=None, **extras: (updates, state),
                                  terminal=True)








def _assert_tree_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
    for x, y in zip(leaves(a), leaves(b)):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# Composition


def test_chain_equals_members_applied_one_after_another():
    members = [trace(0.5), scale_by_adam(b1=0.8, b2=0.95), add_decayed_weights(0.1),
               clip(0.7), scale_by_learning_rate(0.03)]
    tx = chain(*members)
    params = _params()
    state = tx.init(params)
    states = [m.init(params) for m in members]
    for step in range(4):
        g = _grads(step)
        out, state = tx.update(_clone(g), state, params)
        manual = _clone(g)
        for i, m in enumerate(members):
            manual, states[i] = m.update(manual, states[i], params)
        _assert_tree_equal(out, manual)


def test_chain_adamw_matches_closed_form_over_steps():
    b1, b2, eps, wd, lr = 0.9, 0.99, 1e-8, 0.1, 0.05
    tx = chain(scale_by_adam(b1, b2, eps), add_decayed_weights(wd), scale_by_learning_rate(lr))
    params = _params()
    x = _clone(params)
    state = tx.init(params)
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.zeros_like(v) for k, v in x.items()}
    for step in range(5):
        g = _grads(step)
        out, state = tx.update(g, state, params)
        apply_updates(params, out)
        t = step + 1
        for k in x:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            direction = (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + eps)
            x[k] = x[k] - lr * (direction + wd * x[k])
        for k in x:
            torch.testing.assert_close(params[k], x[k], rtol=1e-12, atol=1e-14)


def test_empty_chain_is_identity():
    tx = chain()
    g = _grads(0)
    out, _ = tx.update(_clone(g), tx.init(_params()), _params())
    _assert_tree_equal(out, g)


def test_chain_rejects_non_transform_members():
    with pytest.raises(TypeError, match="GradientTransformation"):
        chain(scale(1.0), lambda u: u)


def test_chain_state_is_tuple_of_member_states_in_order():
    tx = chain(trace(0.9), scale_by_adam())
    state = tx.init(_params())
    assert isinstance(state, tuple) and len(state) == 2
    assert hasattr(state[0], "momentum") and hasattr(state[1], "mu")


def test_chain_leafwise_only_when_every_member_is():
    assert chain(scale_by_adam(), scale_by_learning_rate(0.1)).leafwise
    assert not chain(scale_by_adam(), clip_by_global_norm(1.0)).leafwise


# ----------------------------------------------------------------------------------------------
# The grads extra and the caller's tensors


def test_grads_extra_is_raw_gradient_after_members_write_in_place():
    log: list = []
    tx = chain(scale(2.0), scale(3.0), trace(0.5), _spy(log), scale_by_sign(), _spy(log))
    params = _params()
    g = _grads(0)
    raw = _clone(g)
    out, _ = tx.update(g, tx.init(params), params)
    first, second = log
    for seen, expected in zip(first["updates"], leaves(raw)):
        torch.testing.assert_close(seen, 6.0 * expected, rtol=0, atol=0)
    for record in (first, second):
        for seen, expected in zip(record["grads"], leaves(raw)):
            assert torch.equal(seen, expected)
    for o, expected in zip(leaves(out), leaves(raw)):
        assert torch.equal(o, torch.sign(expected))


def test_grads_extra_of_nested_chain_is_outer_raw_gradient():
    log: list = []
    tx = chain(scale(2.0), chain(scale(5.0), _spy(log)))
    params = _params()
    g = _grads(1)
    tx.update(_clone(g), tx.init(params), params)
    (record,) = log
    for seen, expected in zip(record["grads"], leaves(g)):
        assert torch.equal(seen, expected)
    for seen, expected in zip(record["updates"], leaves(g)):
        assert torch.equal(seen, 10.0 * expected)


@pytest.mark.parametrize("make", [
    lambda: chain(scale(2.0), scale(3.0)),
    lambda: chain(scale(-1.0)),
    lambda: chain(trace(0.9), clip(0.1), scale_by_sign(), add_decayed_weights(0.3),
                  scale_by_learning_rate(0.5)),
    lambda: chain(masked(scale(4.0), ["w"]), partition({"a": scale(2.0), "b": trace(0.5)},
                                                       {"w": "a", "*": "b"}), scale(3.0)),
    lambda: chain(identity(), clip_by_global_norm(0.01), chain(scale(7.0))),
], ids=["scale-scale", "scale", "trace-clip-sign-decay-lr", "masked-partition", "nested"])
def test_chain_never_modifies_the_gradients_or_params_it_is_given(make):
    tx = make()
    params = _params()
    params_before = _clone(params)
    state = tx.init(params)
    for step in range(3):
        g = _grads(step)
        g_before = _clone(g)
        out, state = tx.update(g, state, params)
        _assert_tree_equal(g, g_before)
        _assert_tree_equal(params, params_before)
        assert all(o is not x for o, x in zip(leaves(out), leaves(g)))


def test_chain_with_masked_weight_decay_never_modifies_the_gradients_it_is_given():
    # the decayed parameter is not the first: a positional raw-gradient check must still match
    tx = chain(add_decayed_weights(0.5, mask=["b"]))
    params = _params()
    g = _grads(0)
    g_before = _clone(g)
    out, _ = tx.update(g, tx.init(params), params)
    torch.testing.assert_close(out["b"], g_before["b"] + 0.5 * params["b"], rtol=0, atol=0)
    _assert_tree_equal(g, g_before)


def test_chain_of_scales_outputs_product_times_gradient():
    tx = chain(scale(2.0), scale(3.0))
    g = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    before = _clone(g)
    out, _ = tx.update(g, tx.init(g), [torch.zeros(2), torch.zeros(1, 1)])
    assert torch.equal(out[0], torch.tensor([6.0, -12.0]))
    assert torch.equal(out[1], torch.tensor([[3.0]]))
    _assert_tree_equal(g, before)


def test_extras_reach_every_member_unchanged():
    log: list = []
    tx = chain(_spy(log), scale(2.0), chain(_spy(log)), masked(_spy(log), ["w"]))
    params = _params()

    def hvp(v):
        return v

    val_grads = _grads(7)
    tx.update(_grads(0), tx.init(params), params, loss=1.5, step=7, hvp=hvp,
              val_grads=val_grads, custom="x")
    assert len(log) == 3
    for record in log:
        extras = record["extras"]
        assert extras["loss"] == 1.5 and extras["step"] == 7 and extras["custom"] == "x"
        assert extras["hvp"] is hvp
        assert "grads" in extras
    for record in log[:2]:
        assert record["extras"]["val_grads"] is val_grads
    # inside masked, tree extras are restricted to the selected parameters
    assert list(log[2]["extras"]["val_grads"]) == ["w"]
    assert log[2]["extras"]["val_grads"]["w"] is val_grads["w"]


def test_every_member_sees_the_same_params():
    log: list = []
    tx = chain(_spy(log), scale(2.0), _spy(log))
    params = _params()
    tx.update(_grads(0), tx.init(params), params)
    assert log[0]["params"] is params and log[1]["params"] is params


# ----------------------------------------------------------------------------------------------
# Structure checks


def _stepped_adam():
    tx = chain(trace(0.9), scale_by_adam(), scale_by_learning_rate(0.1))
    params = _params()
    state = tx.init(params)
    _, state = tx.update(_grads(0), state, params)
    return tx, params, state




@pytest.mark.parametrize("bad, message", [
    ({"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)},
     r"'b'.*\(4,\).*\(3,\)"),
    ({"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)},
     r"'w'"),
    ({"w": torch.ones(3, 2, dtype=torch.float64)}, r"missing: \['b'\]"),
    ({"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64),
      "c": torch.ones(1, dtype=torch.float64)}, r"unexpected: \['c'\]"),
    ({"b": torch.ones(3, dtype=torch.float64), "w": torch.ones(3, 2, dtype=torch.float64)},
     r"order"),
    ([torch.ones(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)], r"list"),
], ids=["shape-b", "shape-w", "missing", "unexpected", "order", "list-vs-dict"])
def test_structure_mismatch_raises_naming_the_problem_and_changes_nothing(bad, message):
    tx, params, state = _stepped_adam()
    state_before = [t.clone() for t in _state_tensors(state)]
    counts_before = (state[0].count, state[1].count)
    params_before = _clone(params)
    bad_before = _clone(bad)
    with pytest.raises(ValueError, match=message):
        tx.update(bad, state, params)
    for t, before in zip(_state_tensors(state), state_before):
        assert torch.equal(t, before)
    assert (state[0].count, state[1].count) == counts_before
    _assert_tree_equal(params, params_before)
    _assert_tree_equal(bad, bad_before)


def test_list_length_mismatch_raises():
    tx = chain(scale_by_adam())
    params = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(ValueError, match="1 tensors but params has 2"):
        tx.update([torch.ones(2)], tx.init(params), params)


# ----------------------------------------------------------------------------------------------
# Terminal members


def test_terminal_member_not_last_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"position 0.*terminal|terminal.*last"):
        chain(_terminal(), scale(1.0))
    with pytest.raises(ValueError, match="'fin'"):
        named_chain(("fin", _terminal()), ("lr", scale(1.0)))
    with pytest.raises(ValueError, match="terminal"):
        chain(chain(scale(1.0), _terminal()), scale(1.0))
    with pytest.raises(ValueError, match="terminal"):
        chain(masked(_terminal(), ["*"]), scale(1.0))


def test_terminal_member_last_is_accepted_and_chain_is_terminal():
    assert chain(scale(1.0), _terminal()).terminal
    assert named_chain(("a", scale(1.0)), ("fin", _terminal())).terminal
    assert not chain(scale(1.0), trace(0.9)).terminal


# ----------------------------------------------------------------------------------------------
# Dtypes


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_16_bit_updates_are_widened_to_float32_for_every_member(low):
    log: list = []
    tx = chain(_spy(log), scale(2.0), _spy(log))
    params = {"w": torch.zeros(3, 2, dtype=low), "b": torch.zeros(3, dtype=low)}
    g = {k: torch.randn(v.shape).to(low) for k, v in params.items()}
    g_before = _clone(g)
    out, _ = tx.update(g, tx.init(params), params)
    for record in log:
        assert record["dtypes"] == [torch.float32, torch.float32]
        assert record["grads_dtypes"] == [torch.float32, torch.float32]
        for seen, raw in zip(record["grads"], leaves(g_before)):
            assert torch.equal(seen, raw.float())
    for o, raw in zip(leaves(out), leaves(g_before)):
        assert o.dtype == torch.float32
        assert torch.equal(o, 2.0 * raw.float())
    _assert_tree_equal(g, g_before)


def test_mixed_precision_updates_widen_only_16_bit_leaves():
    log: list = []
    tx = chain(_spy(log))
    params = [torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float64)]
    g = [torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)]
    out, _ = tx.update(g, tx.init(params), params)
    assert log[0]["dtypes"] == [torch.float32, torch.float64]
    assert [o.dtype for o in out] == [torch.float32, torch.float64]


# ----------------------------------------------------------------------------------------------
# named_chain


# ---------------------------------------------------------------------------------------------
# unscaled: the chain without its final scaling and decoupled weight decay, for an optimizer
# to fold into x <- (1 + b) x + a u

def _decaying(count):
    return 0.1 / (1 + count)


@pytest.mark.parametrize("make", [
    lambda: chain(trace(0.9), scale_by_learning_rate(0.1)),
    lambda: chain(scale_by_adam(), scale_by_learning_rate(_decaying)),
    lambda: chain(scale_by_adam(), add_decayed_weights(0.1), scale_by_learning_rate(0.01)),
    lambda: chain(scale_by_adam(), add_decayed_weights(_decaying), scale(-0.5)),
    lambda: named_chain(("decay", add_decayed_weights(0.1)),
                        ("inner", chain(trace(0.5), add_decayed_weights(0.2), scale(-3.0)))),
], ids=["constant-lr", "lr-schedule", "decoupled-decay", "decay-schedule", "nested"])
def test_unscaled_is_the_update_as_a_u_plus_b_x_with_the_same_state(make):
    tx = make()
    params = _params()
    state_a, state_b = tx.init(params), tx.init(params)
    for step in range(3):
        expected, state_a = tx.update(_grads(step), state_a, params)
        unscaled, state_b, a, b = tx.unscaled(_grads(step), state_b, params)
        for o, u, x in zip(leaves(expected), leaves(unscaled), leaves(params)):
            torch.testing.assert_close(o, a * u + b * x, rtol=1e-14, atol=1e-16)
        for s_a, s_b in zip(_state_tensors(state_a), _state_tensors(state_b)):
            assert torch.equal(s_a, s_b)
    assert str(state_a) == str(state_b)  # counts too


def test_unscaled_reads_the_schedules_at_each_count():
    tx = chain(trace(0.9), add_decayed_weights(_decaying), scale_by_learning_rate(_decaying))
    params = _params()
    state = tx.init(params)
    for step in range(3):
        _, state, a, b = tx.unscaled(_grads(step), state, params)
        assert a == -_decaying(step)
        assert b == pytest.approx(-_decaying(step) * _decaying(step), rel=1e-15)


def test_only_trailing_scales_and_unmasked_decays_are_left_to_the_caller():
    assert chain(scale_by_adam(), scale(2.0)).unscaled is not None
    assert chain(scale(2.0), scale_by_adam()).unscaled is None
    assert chain().unscaled is None
    assert scale_by_sign().unscaled is None
    assert add_decayed_weights(0.1, mask=["w"]).unscaled is None
    masked_then_lr = chain(scale_by_adam(), add_decayed_weights(0.1, mask=["w"]), scale(-0.1))
    params = _params()
    u, _, a, b = masked_then_lr.unscaled(_grads(0), masked_then_lr.init(params), params)
    assert (a, b) == (-0.1, 0.0)  # the masked decay ran as a member


def test_unscaled_decay_without_params_names_the_fix():
    tx = chain(scale_by_adam(), add_decayed_weights(0.1), scale(-0.1))
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.unscaled(_grads(0), tx.init(_params()))


# ---------------------------------------------------------------------------------------------
# into_params: the chain adding its updates to the parameters itself (SM3's member), the same
# numbers as unscaled followed by x <- x + b x + a u


@pytest.mark.parametrize("make", [
    lambda: chain(scale_by_sm3(), scale_by_learning_rate(0.1)),
    lambda: chain(scale_by_sm3(b1=0.5), add_decayed_weights(0.1),
                  scale_by_learning_rate(_decaying)),
    lambda: chain(scale(2.0), scale_by_sm3(eps=0.0), scale(-0.1)),
    lambda: named_chain(("clip", clip(1.0)),
                        ("inner", chain(scale_by_sm3(b2=0.9), add_decayed_weights(0.2),
                                        scale(-3.0)))),
    lambda: chain(scale_by_sm3()),
], ids=["lr", "momentum-decay-schedule", "member-before", "nested", "no-tail"])
@pytest.mark.parametrize("a, b", [(1.0, 0.0), (-0.5, 0.1), (torch.tensor(-0.5), torch.tensor(0.1))])
def test_into_params_adds_the_update_with_the_same_numbers_and_state(monkeypatch, make, a, b):
    monkeypatch.setattr(sm3_module, "BLOCK_ELEMENTS", 2)  # blocks of one row
    tx = make()
    x_a, x_b = _params(), _params()
    state_a, state_b = tx.init(x_a), tx.init(x_b)
    for step in range(4):  # the reference: what an optimizer does with unscaled
        if tx.unscaled is None:
            out, state_a = tx.update(_grads(step), state_a, x_a)
            add_scaled_(leaves(x_a), leaves(out), a, b)
        else:
            out, state_a, tail_a, tail_b = tx.unscaled(_grads(step), state_a, x_a)
            add_scaled_(leaves(x_a), leaves(out), a * tail_a, a * tail_b + b)
        state_b = tx.into_params(_grads(step), state_b, x_b, a, b)
        _assert_tree_equal(x_a, x_b)
        for s_a, s_b in zip(_state_tensors(state_a), _state_tensors(state_b)):
            assert torch.equal(s_a, s_b)
    assert str(state_a) == str(state_b)  # counts too


def test_into_params_is_offered_where_the_last_member_before_the_affine_tail_has_it():
    assert chain(scale_by_sm3(), add_decayed_weights(0.1), scale(-0.1)).into_params is not None
    assert chain(chain(scale_by_sm3()), scale(-0.1)).into_params is not None
    assert chain(scale_by_sm3(), scale_by_sign()).into_params is None
    assert chain(scale_by_sm3(), add_decayed_weights(0.1, mask=["w"]), scale(-0.1)).into_params \
        is None  # a masked decay is a member, not part of the tail
    assert chain(scale_by_adam(), scale(-0.1)).into_params is None
    assert chain(scale(2.0)).into_params is None and chain().into_params is None


def test_named_chain_state_is_keyed_by_member_names_in_order():
    tx = named_chain(("momentum", trace(0.9)), ("adam", scale_by_adam()),
                     ("lr", scale_by_learning_rate(0.1)))
    state = tx.init(_params())
    assert list(state) == ["momentum", "adam", "lr"]
    assert hasattr(state["momentum"], "momentum") and hasattr(state["adam"], "nu")


def test_named_chain_outputs_equal_chain_outputs():
    members = [trace(0.9), scale_by_adam(), scale_by_learning_rate(0.1)]
    named = named_chain(*[(f"m{i}", m) for i, m in enumerate(members)])
    plain = chain(*members)
    params = _params()
    s_named, s_plain = named.init(params), plain.init(params)
    for step in range(3):
        g = _grads(step)
        o_named, s_named = named.update(_clone(g), s_named, params)
        o_plain, s_plain = plain.update(_clone(g), s_plain, params)
        _assert_tree_equal(o_named, o_plain)
    for i in range(3):
        for a, b in zip(_state_tensors(s_named[f"m{i}"]), _state_tensors(s_plain[i])):
            assert torch.equal(a, b)


@pytest.mark.parametrize("members", [
    [("a", scale(1.0)), ("a", scale(2.0))],
    [("", scale(1.0))],
    [("a.b", scale(1.0))],
    [(3, scale(1.0))],
], ids=["duplicate", "empty", "dot", "not-a-string"])
def test_named_chain_rejects_bad_names(members):
    with pytest.raises(ValueError, match="unique non-empty strings"):
        named_chain(*members)


@pytest.mark.parametrize("member", [("a",), ("a", lambda u: u), scale(1.0)],
                         ids=["one-item", "not-a-transform", "bare-transform"])
def test_named_chain_rejects_members_that_are_not_name_transform_pairs(member):
    with pytest.raises(TypeError, match=r"\(name, transform\)"):
        named_chain(member)


def test_named_chain_extras_and_grads_reach_members():
    log: list = []
    tx = named_chain(("x2", scale(2.0)), ("spy", _spy(log)))
    params = _params()
    g = _grads(2)
    tx.update(_clone(g), tx.init(params), params, loss=math.pi)
    (record,) = log
    assert record["extras"]["loss"] == math.pi
    for seen, raw in zip(record["grads"], leaves(g)):
        assert torch.equal(seen, raw)


def _wrapped_against_alone(wrap, recipe, feed=None, steps=6):
    """Parameters after ``steps`` steps of ``ChainOptimizer(wrap(recipe))`` and of
    ``ChainOptimizer(recipe)``; ``feed(t, grads)`` gives the lone optimizer's gradients of
    step t (None: skip its step), default the same gradients."""
    from gradchain.optimizers import ChainOptimizer

    shapes = [(6, 5), (7,), (4, 3)]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    wrapped = [torch.nn.Parameter(t.clone()) for t in start]
    alone = [torch.nn.Parameter(t.clone()) for t in start]
    opt_wrapped, opt_alone = ChainOptimizer(wrapped, wrap(recipe)), ChainOptimizer(alone, recipe)
    for t in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(wrapped, grads):
            p.grad = g.clone()
        opt_wrapped.step()
        fed = grads if feed is None else feed(t, grads)
        if fed is not None:
            for p, g in zip(alone, fed):
                p.grad = g.clone()
            opt_alone.step()
    return wrapped, alone


@pytest.mark.parametrize("recipe", ["soap", "sm3", "adamw"])
@pytest.mark.parametrize("wrapper", ["apply_if_finite", "inject_hyperparams", "multi_steps"])
def test_wrappers_move_the_parameters_as_their_inner_recipe_alone(recipe, wrapper):
    # apply_if_finite, inject_hyperparams (constant values) and multi_steps (fed the means)
    # apply their inner recipe through its own into_params or unscaled form: the same numbers,
    # bitwise, as the recipe alone
    from gradchain import chains
    from gradchain.chains import apply_if_finite, inject_hyperparams, multi_steps

    factories = {"soap": (chains.soap, dict(learning_rate=0.01, precondition_frequency=2)),
                 "sm3": (chains.sm3, dict(learning_rate=0.1, momentum=0.9)),
                 "adamw": (chains.adamw, dict(learning_rate=0.01, weight_decay=0.1))}
    factory, options = factories[recipe]
    wrap = {"apply_if_finite": apply_if_finite,
            "inject_hyperparams": lambda tx: inject_hyperparams(factory)(**options),
            "multi_steps": lambda tx: multi_steps(tx, 2)}[wrapper]
    previous = []

    def means_of_two(t, grads):  # what multi_steps(., 2) hands its inner recipe
        if t % 2 == 0:
            previous[:] = grads
            return None
        return [(torch.zeros_like(a) + a + b) / 2 for a, b in zip(previous, grads)]

    feed = means_of_two if wrapper == "multi_steps" else None

    assert wrap(factory(**options)).into_params is not None
    wrapped, alone = _wrapped_against_alone(wrap, factory(**options), feed)
    assert all(torch.equal(p, q) for p, q in zip(wrapped, alone))


def test_apply_if_finite_into_params_skips_a_non_finite_step():
    from gradchain.chains import apply_if_finite

    tx = apply_if_finite(scale_by_sm3())
    x = [torch.ones(3, 2, dtype=torch.float64)]
    state = tx.init(x)
    state = tx.into_params([torch.full((3, 2), math.nan, dtype=torch.float64)], state, x,
                           -0.1, 0.0)
    assert torch.equal(x[0], torch.ones(3, 2, dtype=torch.float64))
    assert (state.consecutive_skips, state.total_skips) == (1, 1)
    state = tx.into_params([torch.ones(3, 2, dtype=torch.float64)], state, x, -0.1, 0.0)
    assert state.consecutive_skips == 0 and not torch.equal(x[0], torch.ones(3, 2))


# ---------------------------------------------------------------------------------------------
# inject_hyperparams offers unscaled when the transform it builds does: its scale and decay
# are folded into the addition to the parameters, as without the injection


def _rate(count: int) -> float:
    return 0.05 / (1 + count)


def _weight_decay(count: int) -> float:
    return 0.1 + 0.02 * count


def _b1(count: int) -> float:
    return 0.5 + 0.04 * count


def _injected_and_plain(case: str) -> tuple[GradientTransformation, GradientTransformation]:
    """A transform with inject_hyperparams and the same one without it (its hyperparameters
    the same schedules, taken by the transform itself)."""
    from gradchain.chains import adamw, inject_hyperparams

    if case == "adamw":
        return (inject_hyperparams(adamw)(learning_rate=_rate, weight_decay=_weight_decay),
                adamw(learning_rate=_rate, weight_decay=_weight_decay))
    if case == "adamw-after-clip":
        return (chain(clip_by_global_norm(1.0), inject_hyperparams(adamw)(
                    learning_rate=_rate, weight_decay=_weight_decay)),
                chain(clip_by_global_norm(1.0), adamw(learning_rate=_rate,
                                                      weight_decay=_weight_decay)))
    if case == "lr-member":
        return (chain(scale_by_adam(), inject_hyperparams(scale_by_learning_rate)(_rate)),
                chain(scale_by_adam(), scale_by_learning_rate(_rate)))
    if case == "injected-tail":  # affine members stay affine: the chain folds both
        return (chain(scale_by_adam(), inject_hyperparams(add_decayed_weights)(_weight_decay),
                      inject_hyperparams(scale_by_learning_rate)(_rate)),
                chain(scale_by_adam(), add_decayed_weights(_weight_decay),
                      scale_by_learning_rate(_rate)))
    assert case == "adam-before-tail"
    return (chain(inject_hyperparams(scale_by_adam)(b1=_b1), add_decayed_weights(0.1),
                  scale_by_learning_rate(0.01)),
            chain(scale_by_adam(b1=_b1), add_decayed_weights(0.1), scale_by_learning_rate(0.01)))


_INJECTED_CASES = ["adamw", "adamw-after-clip", "lr-member", "injected-tail",
                   "adam-before-tail"]


def test_inject_hyperparams_offers_unscaled_where_the_transform_it_builds_does():
    from gradchain.chains import adamw, inject_hyperparams

    assert inject_hyperparams(adamw)(learning_rate=_rate).unscaled is not None
    assert inject_hyperparams(scale_by_learning_rate)(_rate).unscaled is not None
    assert inject_hyperparams(scale_by_adam)(b1=_b1).unscaled is None
    assert inject_hyperparams(add_decayed_weights)(0.1, mask=["w"]).unscaled is None
    assert inject_hyperparams(scale_by_learning_rate)(_rate).affine
    assert not inject_hyperparams(add_decayed_weights)(0.1, mask=["w"]).affine
    for case in _INJECTED_CASES:
        assert _injected_and_plain(case)[0].unscaled is not None


@pytest.mark.parametrize("case", _INJECTED_CASES)
def test_injected_unscaled_gives_the_numbers_and_state_of_the_plain_transform(case):
    injected, plain = _injected_and_plain(case)
    params = _params()
    state_i, state_p = injected.init(params), plain.init(params)
    for step in range(4):
        u_i, state_i, a_i, b_i = injected.unscaled(_grads(step), state_i, params)
        u_p, state_p, a_p, b_p = plain.unscaled(_grads(step), state_p, params)
        _assert_tree_equal(u_i, u_p)
        assert (a_i, b_i) == (a_p, b_p)
        for s_i, s_p in zip(_state_tensors(state_i), _state_tensors(state_p)):
            assert torch.equal(s_i, s_p)
    if case == "adamw":  # the values of the last step, recorded as update records them
        assert state_i.count == 4
        assert state_i.hyperparams["learning_rate"] == _rate(3) == -a_i
        assert state_i.hyperparams["weight_decay"] == _weight_decay(3)


def _moved_by_update(tx: GradientTransformation, steps: int) -> dict[str, torch.Tensor]:
    """The parameters after ``steps`` steps of ``update`` and ``apply_updates``."""
    params = _params()
    state = tx.init(params)
    for step in range(steps):
        out, state = tx.update(_grads(step), state, params)
        apply_updates(params, out)
    return params


def _moved_by_compiled_step(tx: GradientTransformation, steps: int) -> dict[str, torch.Tensor]:
    """The parameters after ``steps`` runs of the step that a compiled ChainOptimizer compiles
    (here run eagerly): ``unscaled`` and ``x <- x + b·x + a·u`` where the transform offers it."""
    from gradchain.optimizers.adapter import _make_step

    step_fn = _make_step(tx)
    params = _params()
    state = tx.init(params)
    for step in range(steps):
        state = step_fn(_grads(step), state, params, {})
    return params


@pytest.mark.parametrize("case", _INJECTED_CASES)
@pytest.mark.parametrize("path", ["update", "compiled-step", "optimizer"])
def test_injected_transform_moves_the_parameters_as_the_plain_one(case, path):
    # bitwise, with the learning rate, weight decay or b1 changing at every step
    injected, plain = _injected_and_plain(case)
    if path == "optimizer":  # eager ChainOptimizer: into_params where offered
        moved = _wrapped_against_alone(lambda tx: injected, plain)
    else:
        run = {"update": _moved_by_update, "compiled-step": _moved_by_compiled_step}[path]
        moved = run(injected, 6), run(plain, 6)
    assert all(torch.equal(p, q) for p, q in zip(leaves(moved[0]), leaves(moved[1])))
