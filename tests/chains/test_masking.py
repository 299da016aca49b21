"""masked, partition and freeze: routing by name pattern, predicate and position, per-subset
state, parity with optax, and chunking invariance of leafwise chains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradchain.chains import chain, freeze, masked, partition
from gradchain.core import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    flatten_state,
    merge_state,
    select_state,
)
from gradchain.transforms import (
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)
from chain_helpers import clone as _clone, state_tensors as _tensors

SHAPES = {"emb.weight": (5, 3), "l1.weight": (4, 3), "l1.bias": (4,), "l2.weight": (2, 4),
          "l2.bias": (2,)}
WEIGHTS = ["emb.weight", "l1.weight", "l2.weight"]
BIASES = ["l1.bias", "l2.bias"]


def _tree(seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}






def _spy(log: list) -> GradientTransformation:
    def update(updates, state, params=None, **extras):
        log.append({"updates": updates, "params": params, "extras": extras})
        return updates, state

    return GradientTransformation(lambda params: EmptyState(), update, leafwise=True)


def _optax():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    return jax, optax


def _to_jax(jnp, tree):
    return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}


def _to_torch(tree):
    return {k: torch.from_numpy(np.array(v)) for k, v in tree.items()}


# ----------------------------------------------------------------------------------------------
# masked


def test_masked_transforms_selected_params_and_passes_others_through_unchanged():
    tx = masked(scale(10.0), ["*.weight"])
    params, g = _tree(0), _tree(1)
    before = _clone(g)
    out, _ = tx.update(g, tx.init(params), params)
    assert list(out) == list(SHAPES)
    for k in WEIGHTS:
        assert torch.equal(out[k], 10.0 * before[k])
    for k in BIASES:
        assert torch.equal(out[k], before[k])
    for k in SHAPES:
        assert torch.equal(g[k], before[k])


@pytest.mark.parametrize("mask", [
    ["*.weight"],
    lambda name, p: p.ndim >= 2,
    {"*.bias": False, "*": True},
    {"emb.weight": True, "l1.weight": True, "l1.bias": False, "l2.weight": True,
     "l2.bias": False},
], ids=["patterns", "predicate", "pattern-mapping-first-match", "exact-names"])
def test_masked_selector_forms_select_the_same_params(mask):
    tx = masked(scale(-3.0), mask)
    params, g = _tree(0), _tree(1)
    out, _ = tx.update(_clone(g), tx.init(params), params)
    for k in SHAPES:
        expected = -3.0 * g[k] if k in WEIGHTS else g[k]
        assert torch.equal(out[k], expected)


def test_masked_list_of_bools_selects_by_position_in_a_list_tree():
    tx = masked(scale(2.0), [False, True, False])
    params = [torch.zeros(2), torch.zeros(3), torch.zeros(1)]
    g = [torch.ones(2), torch.full((3,), 4.0), torch.full((1,), 5.0)]
    out, state = tx.update(g, tx.init(params), params)
    assert torch.equal(out[0], torch.ones(2))
    assert torch.equal(out[1], torch.full((3,), 8.0))
    assert torch.equal(out[2], torch.full((1,), 5.0))


def test_masked_patterns_on_list_tree_use_positions_as_names():
    tx = masked(scale(2.0), ["1"])
    g = [torch.ones(2), torch.ones(2)]
    out, _ = tx.update(g, tx.init(g), [torch.zeros(2), torch.zeros(2)])
    assert torch.equal(out[0], torch.ones(2)) and torch.equal(out[1], torch.full((2,), 2.0))


def test_masked_refuses_positional_list_for_named_params():
    params = _tree(0)
    with pytest.raises(ValueError, match="named"):
        masked(scale(2.0), [True] * len(SHAPES)).init(params)


def test_masked_mapping_without_a_match_names_the_parameter():
    params = _tree(0)
    with pytest.raises(ValueError, match="'l1.bias'"):
        masked(scale(2.0), {"*.weight": True}).init(params)


def test_masked_list_of_wrong_length_raises():
    params = [torch.zeros(2), torch.zeros(2)]
    with pytest.raises(ValueError, match="3 entries for 2 parameters"):
        masked(scale(2.0), [True, False, True]).init(params)


def test_masked_inner_state_is_allocated_for_selected_params_only():
    tx = masked(scale_by_adam(), lambda name, p: p.ndim >= 2)
    params = _tree(0)
    state = tx.init(params)
    assert len(state.mu) == len(SHAPES) and len(state.nu) == len(SHAPES)
    for i, k in enumerate(SHAPES):
        if k in WEIGHTS:
            assert state.mu[i].shape == SHAPES[k] and state.nu[i].shape == SHAPES[k]
        else:
            assert state.mu[i] is None and state.nu[i] is None
    assert len(_tensors(state)) == 2 * len(WEIGHTS)
    _, state = tx.update(_tree(1), state, params)
    assert len(_tensors(state)) == 2 * len(WEIGHTS)
    assert state.mu[2] is None and state.count == 1


def test_masked_inner_sees_only_selected_params_and_extras():
    log: list = []
    tx = chain(masked(_spy(log), ["l1.*"]))
    params, g, val = _tree(0), _tree(1), _tree(2)
    tx.update(g, tx.init(params), params, val_grads=val, loss=2.0)
    (record,) = log
    assert list(record["updates"]) == ["l1.weight", "l1.bias"]
    assert list(record["params"]) == ["l1.weight", "l1.bias"]
    assert list(record["extras"]["grads"]) == ["l1.weight", "l1.bias"]
    assert record["extras"]["grads"]["l1.bias"] is g["l1.bias"]
    assert list(record["extras"]["val_grads"]) == ["l1.weight", "l1.bias"]
    assert record["extras"]["loss"] == 2.0


def test_masked_add_decayed_weights_decays_selected_params_only():
    tx = masked(add_decayed_weights(0.25), ["*.weight"])
    params, g = _tree(0), _tree(1)
    out, _ = tx.update(_clone(g), tx.init(params), params)
    for k in SHAPES:
        expected = g[k] + 0.25 * params[k] if k in WEIGHTS else g[k]
        torch.testing.assert_close(out[k], expected, rtol=0, atol=0)


def test_masked_with_nothing_selected_is_identity_and_keeps_no_tensors():
    tx = masked(scale_by_adam(), ["nothing*"])
    params, g = _tree(0), _tree(1)
    state = tx.init(params)
    out, state = tx.update(_clone(g), state, params)
    assert _tensors(state) == []
    for k in SHAPES:
        assert torch.equal(out[k], g[k])


def test_masked_scale_by_adam_matches_optax_masked_over_10_steps():
    jax, optax = _optax()
    jnp = jax.numpy
    mask = {k: k in WEIGHTS for k in SHAPES}
    ours = masked(scale_by_adam(b1=0.8, b2=0.95, eps=1e-6), ["*.weight"])
    ref = optax.masked(optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-6), mask)
    ref_update = jax.jit(ref.update)
    params = _tree(0)
    s_ours, s_ref = ours.init(params), ref.init(_to_jax(jnp, params))
    for step in range(10):
        g = _tree(10 + step)
        o_ours, s_ours = ours.update(_clone(g), s_ours, params)
        o_ref, s_ref = ref_update(_to_jax(jnp, g), s_ref, _to_jax(jnp, params))
        o_ref = _to_torch(o_ref)
        for k in SHAPES:
            torch.testing.assert_close(o_ours[k], o_ref[k], rtol=1e-12, atol=1e-14)


def test_masked_flags_follow_inner():
    assert masked(scale_by_adam(), ["*"]).leafwise
    assert not masked(GradientTransformation(lambda p: (), lambda u, s, p=None, **e: (u, s)),
                      ["*"]).leafwise


# ----------------------------------------------------------------------------------------------
# partition


@pytest.mark.parametrize("labels", [
    lambda name, p: "up" if p.ndim >= 2 else "down",
    {"*.bias": "down", "*": "up"},
    {"emb.weight": "up", "l1.weight": "up", "l1.bias": "down", "l2.weight": "up",
     "l2.bias": "down"},
], ids=["callable", "pattern-mapping", "exact-names"])
def test_partition_routes_each_param_to_its_labelled_transform(labels):
    tx = partition({"up": scale(2.0), "down": scale(-0.5)}, labels)
    params, g = _tree(0), _tree(1)
    out, _ = tx.update(_clone(g), tx.init(params), params)
    assert list(out) == list(SHAPES)
    for k in SHAPES:
        assert torch.equal(out[k], (2.0 if k in WEIGHTS else -0.5) * g[k])


def test_partition_labels_by_list_for_list_tree():
    tx = partition({"a": scale(2.0), "b": trace(0.5)}, ["b", "a", "b"])
    params = [torch.zeros(2), torch.zeros(3), torch.zeros(1)]
    state = tx.init(params)
    assert state["a"] == EmptyState()
    assert [m is None for m in state["b"].momentum] == [False, True, False]
    g = [torch.ones(2), torch.ones(3), torch.ones(1)]
    out, state = tx.update(_clone(g), state, params)
    out, state = tx.update(_clone(g), state, params)
    assert torch.equal(out[0], torch.full((2,), 1.5))  # trace: 1 + 0.5 * 1
    assert torch.equal(out[1], torch.full((3,), 2.0))
    assert torch.equal(out[2], torch.full((1,), 1.5))


def test_partition_refuses_positional_labels_for_named_params():
    with pytest.raises(ValueError, match="named"):
        partition({"a": scale(1.0)}, ["a"] * len(SHAPES)).init(_tree(0))


def test_partition_unknown_label_raises_listing_known_labels():
    tx = partition({"b": scale(1.0), "a": scale(2.0)}, {"*.bias": "oops", "*": "a"})
    with pytest.raises(ValueError, match=r"'l1.bias'.*'oops'.*known labels: \['a', 'b'\]"):
        tx.init(_tree(0))


def test_partition_without_transforms_raises():
    with pytest.raises(ValueError):
        partition({}, lambda n, p: "a")


def test_partition_state_per_label_covers_its_params_only():
    tx = partition({"adam": scale_by_adam(), "mom": trace(0.9)}, {"*.bias": "mom", "*": "adam"})
    state = tx.init(_tree(0))
    assert list(state) == ["adam", "mom"]
    names = list(SHAPES)
    assert [names[i] for i, m in enumerate(state["adam"].mu) if m is not None] == WEIGHTS
    assert [names[i] for i, m in enumerate(state["mom"].momentum) if m is not None] == BIASES
    assert len(_tensors(state)) == 2 * len(WEIGHTS) + len(BIASES)


def test_partition_label_without_params_works_and_keeps_no_tensors():
    tx = partition({"a": scale(2.0), "b": trace(0.5), "unused": scale_by_rms()},
                   {"*.bias": "b", "*": "a"})
    params = _tree(0)
    state = tx.init(params)
    assert state["unused"].nu == [None] * len(SHAPES)
    g1, g2 = _tree(1), _tree(2)
    _, state = tx.update(_clone(g1), state, params)
    out, state = tx.update(_clone(g2), state, params)
    assert state["unused"].nu == [None] * len(SHAPES)
    assert state["unused"].count == 2
    for k in SHAPES:
        expected = 2.0 * g2[k] if k in WEIGHTS else g2[k] + 0.5 * g1[k]
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-15)


def test_partition_matches_optax_partition_over_10_steps():
    jax, optax = _optax()
    jnp = jax.numpy
    labels = {k: ("adam" if k in WEIGHTS else "mom") for k in SHAPES}
    ours = partition({"adam": chain(scale_by_adam(b1=0.7), scale_by_learning_rate(0.01)),
                      "mom": chain(trace(0.9), scale_by_learning_rate(0.1))},
                     {"*.bias": "mom", "*": "adam"})
    make_ref = getattr(optax, "partition", None) or optax.multi_transform
    ref = make_ref({"adam": optax.adam(0.01, b1=0.7), "mom": optax.sgd(0.1, momentum=0.9)},
                   labels)
    ref_update = jax.jit(ref.update)
    params = _tree(0)
    p_ref = _to_jax(jnp, params)
    s_ours, s_ref = ours.init(params), ref.init(p_ref)
    for step in range(10):
        g = _tree(20 + step)
        o_ours, s_ours = ours.update(_clone(g), s_ours, params)
        o_ref, s_ref = ref_update(_to_jax(jnp, g), s_ref, p_ref)
        apply_updates(params, o_ours)
        p_ref = optax.apply_updates(p_ref, o_ref)
        o_ref = _to_torch(o_ref)
        for k in SHAPES:
            torch.testing.assert_close(o_ours[k], o_ref[k], rtol=1e-12, atol=1e-14)
    for k, v in _to_torch(p_ref).items():
        torch.testing.assert_close(params[k], v, rtol=1e-12, atol=1e-14)


def test_partition_flags():
    assert partition({"a": scale_by_adam(), "b": trace()}, lambda n, p: "a").leafwise
    term = GradientTransformation(lambda p: (), lambda u, s, p=None, **e: (u, s), terminal=True)
    assert partition({"a": scale(1.0), "b": term}, lambda n, p: "a").terminal


@pytest.mark.parametrize("members", ["soap+adamw", "sm3+sgd", "sgd+adamw"])
def test_each_part_of_a_partition_moves_as_it_would_alone(members):
    # in an optimizer the partition adds each member's updates to its parameters the way that
    # member alone would (its own into_params, or its unscaled form): the same numbers, bitwise
    from gradchain import chains
    from gradchain.optimizers import ChainOptimizer

    recipes = {"soap": chains.soap(0.01, precondition_frequency=2),
               "adamw": chains.adamw(0.01, weight_decay=0.1), "sm3": chains.sm3(0.1, momentum=0.9),
               "sgd": chains.sgd(0.05, momentum=0.9, weight_decay=0.01)}
    matrices, vectors = members.split("+")

    def parameters():
        return {k: torch.nn.Parameter(t) for k, t in _tree(0).items()}

    whole, apart_w, apart_b = parameters(), parameters(), parameters()
    tx = partition({"w": recipes[matrices], "b": recipes[vectors]},
                   lambda name, p: "w" if p.ndim == 2 else "b")
    assert tx.into_params is not None
    optimizers = [ChainOptimizer(whole.items(), tx),
                  ChainOptimizer([apart_w[k] for k in WEIGHTS], recipes[matrices]),
                  ChainOptimizer([apart_b[k] for k in BIASES], recipes[vectors])]
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for k in SHAPES:
            grad = torch.randn(SHAPES[k], generator=gen, dtype=torch.float64)
            whole[k].grad = grad.clone()
            (apart_w if k in WEIGHTS else apart_b)[k].grad = grad.clone()
        for opt in optimizers:
            opt.step()
    for k in SHAPES:
        assert torch.equal(whole[k], (apart_w if k in WEIGHTS else apart_b)[k]), k


def test_masked_into_params_applies_the_inner_form_and_passes_the_rest():
    # masked(inner).into_params: the selected parameters as inner's own into_params/unscaled
    # would move them, the others by their raw updates, x <- x + b x + a g
    from gradchain.core import add_scaled_
    from gradchain.transforms import scale_by_sm3

    for inner in (scale_by_sm3(b1=0.9), chain(scale_by_adam(), add_decayed_weights(0.1))):
        tx = masked(inner, WEIGHTS)
        assert tx.into_params is not None
        x_a, x_b = _tree(1), _tree(1)
        state_a, state_b = tx.init(x_a), inner.init({k: x_b[k] for k in WEIGHTS})
        for t in range(4):
            g = _tree(10 + t)
            state_a = tx.into_params(_clone(g), state_a, x_a, -0.1, -0.01)
            chosen_x = {k: x_b[k] for k in WEIGHTS}
            chosen_g = {k: g[k].clone() for k in WEIGHTS}
            if inner.into_params is not None:
                state_b = inner.into_params(chosen_g, state_b, chosen_x, -0.1, -0.01)
            else:
                out, state_b, a, b = inner.unscaled(chosen_g, state_b, chosen_x)
                add_scaled_(list(chosen_x.values()), list(out.values()), -0.1 * a,
                            -0.1 * b - 0.01)
            add_scaled_([x_b[k] for k in BIASES], [g[k] for k in BIASES], -0.1, -0.01)
            for k in SHAPES:
                assert torch.equal(x_a[k], x_b[k]), k


def test_routing_offers_into_params_only_where_a_member_applies_itself():
    assert masked(trace(0.9), WEIGHTS).into_params is None
    assert partition({"a": trace(0.9), "b": scale(2.0)}, lambda n, p: "a").into_params is not None
    assert partition({"a": trace(0.9), "b": trace(0.5)}, lambda n, p: "a").into_params is None


# ----------------------------------------------------------------------------------------------
# freeze


@pytest.mark.parametrize("mask", [["l1.*", "emb.*"], lambda n, p: n.startswith(("l1", "emb"))],
                         ids=["patterns", "predicate"])
def test_frozen_params_get_exact_zeros_and_others_pass_through(mask):
    tx = freeze(mask)
    params, g = _tree(0), _tree(1)
    before = _clone(g)
    out, _ = tx.update(g, tx.init(params), params)
    frozen = ["emb.weight", "l1.weight", "l1.bias"]
    for k in SHAPES:
        if k in frozen:
            assert torch.equal(out[k], torch.zeros(SHAPES[k], dtype=torch.float64))
        else:
            assert torch.equal(out[k], before[k])
        assert torch.equal(g[k], before[k])


def test_freeze_by_list_of_bools_on_list_tree():
    tx = freeze([True, False])
    g = [torch.ones(2), torch.ones(3)]
    out, _ = tx.update(g, tx.init(g), [torch.zeros(2), torch.zeros(3)])
    assert torch.equal(out[0], torch.zeros(2)) and torch.equal(out[1], torch.ones(3))


def test_frozen_params_do_not_move_at_the_end_of_a_chain():
    tx = chain(scale_by_adam(), scale_by_learning_rate(0.1), freeze(["*.bias"]))
    params = _tree(0)
    before = _clone(params)
    state = tx.init(params)
    for step in range(3):
        out, state = tx.update(_tree(30 + step), state, params)
        apply_updates(params, out)
    for k in SHAPES:
        assert torch.equal(params[k], before[k]) == (k in BIASES)


# ----------------------------------------------------------------------------------------------
# Chunking invariance of leafwise chains


def _run_chunked(tx, chunks, steps=5):
    """Runs ``steps`` updates, each over the chunks of parameter positions one after another:
    every chunk is handed its slice of the state at the start of the step, and its new state is
    merged back."""
    params = _tree(0)
    names = list(params)
    state = tx.init(params)
    outputs = []
    for step in range(steps):
        g = _tree(40 + step)
        start = state
        out = {}
        for chunk in chunks:
            sub_g = {names[i]: g[names[i]] for i in chunk}
            sub_p = {names[i]: params[names[i]] for i in chunk}
            o, part = tx.update(sub_g, select_state(start, chunk), sub_p, step=step)
            assert list(o) == list(sub_g)
            out.update(o)
            state = merge_state(state, part, chunk)
        out = {n: out[n] for n in names}
        outputs.append(_clone(out))
        apply_updates(params, out)
    return outputs, params, state


def _masked_chain():
    return chain(masked(trace(0.9), ["*.weight"]),
                 scale_by_adam(b1=0.8, b2=0.95),
                 add_decayed_weights(0.1, mask=lambda n, p: p.ndim >= 2),
                 scale_by_learning_rate(lambda count: 0.01 / (1 + count)))


def _partition():
    return partition({"adam": chain(scale_by_adam(), scale_by_learning_rate(0.01)),
                      "mom": chain(trace(0.9, nesterov=True), add_decayed_weights(0.2),
                                   scale_by_learning_rate(0.1)),
                      "unused": scale_by_rms()},
                     {"*.bias": "mom", "*": "adam"})


CHUNKINGS = {
    "one-per-param": [[0], [1], [2], [3], [4]],
    "biases-first": [[2, 4], [0, 1, 3]],
    "mixed": [[0, 1], [2], [3, 4]],
    "reversed": [[4, 3], [2, 1, 0]],
}


@pytest.mark.parametrize("make", [_masked_chain, _partition], ids=["masked-chain", "partition"])
@pytest.mark.parametrize("chunking", list(CHUNKINGS), ids=list(CHUNKINGS))
def test_chunked_leafwise_update_is_bitwise_equal_to_whole_update(make, chunking):
    tx = make()
    assert tx.leafwise
    whole_out, whole_params, whole_state = _run_chunked(make(), [list(range(len(SHAPES)))])
    chunk_out, chunk_params, chunk_state = _run_chunked(tx, CHUNKINGS[chunking])
    for a, b in zip(whole_out, chunk_out):
        for k in SHAPES:
            assert torch.equal(a[k], b[k]), k
    for k in SHAPES:
        assert torch.equal(whole_params[k], chunk_params[k])
    per_a, group_a = flatten_state(whole_state, len(SHAPES))
    per_b, group_b = flatten_state(chunk_state, len(SHAPES))
    assert group_a == group_b
    for a, b in zip(per_a, per_b):
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key

