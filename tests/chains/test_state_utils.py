"""core's state helpers: select_state / merge_state / expand_state restrict and restore the
per-parameter part of a state; flatten_state / unflatten_state map it to torch's per-parameter
layout with readable keys."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from gradchain.chains import chain, inject_hyperparams, masked, named_chain
from gradchain.core import (
    expand_state,
    flatten_state,
    merge_state,
    select_state,
    unflatten_state,
)
from gradchain.transforms import scale_by_adam, scale_by_learning_rate, trace

SHAPES = {"w1": (3, 2), "b1": (3,), "w2": (2, 3), "b2": (2,)}


def _params(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}


def _grads(step: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}


def _tx():
    return named_chain(
        ("mom", trace(0.9)),
        ("adam", masked(scale_by_adam(), ["w*"])),
        ("lr", inject_hyperparams(scale_by_learning_rate)(learning_rate=lambda c: 0.1 / (c + 1))),
    )


def _stepped_state(dtype=torch.float32, steps=2):
    tx = _tx()
    params = _params(dtype)
    state = tx.init(params)
    for step in range(steps):
        _, state = tx.update(_grads(step, dtype), state, params)
    return state


class Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


class Custom(NamedTuple):
    count: int
    scale: torch.Tensor
    pairs: list
    plain: tuple


def _custom(size=3) -> Custom:
    return Custom(
        count=4,
        scale=torch.tensor(2.5),
        pairs=[Pair(torch.full((i + 1,), float(i)), torch.full((2,), -float(i)))
               for i in range(size)],
        plain=(7, [torch.full((1,), 10.0 + i) for i in range(size)], (torch.tensor(1.0),)),
    )


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# select / merge / expand


def test_select_state_keeps_per_param_entries_at_index_and_group_values():
    state = _custom()
    part = select_state(state, [2, 0])
    assert type(part) is Custom and part.count == 4 and part.scale is state.scale
    assert [p is q for p, q in zip(part.pairs, [state.pairs[2], state.pairs[0]])] == [True, True]
    assert part.plain[0] == 7
    assert _same(part.plain[1], [state.plain[1][2], state.plain[1][0]])
    assert type(part.plain) is tuple and part.plain[2][0] is state.plain[2][0]


def test_select_then_merge_round_trips_a_real_chain_state():
    state = _stepped_state()
    index = [1, 3]
    merged = merge_state(state, select_state(state, index), index)
    per_a, group_a = flatten_state(state, len(SHAPES))
    per_b, group_b = flatten_state(merged, len(SHAPES))
    assert group_a == group_b
    for a, b in zip(per_a, per_b):
        assert list(a) == list(b) and all(a[k] is b[k] for k in a)
    assert list(merged) == ["mom", "adam", "lr"]
    assert type(merged["adam"]) is type(state["adam"])


def test_merge_writes_per_param_entries_at_index_and_group_values_from_part():
    state = _custom()
    part = select_state(state, [1])
    new_pair = Pair(torch.zeros(2), torch.zeros(2))
    part = part._replace(count=5, pairs=[new_pair], plain=(8, [torch.zeros(1)], part.plain[2]))
    merged = merge_state(state, part, [1])
    assert merged.count == 5 and merged.plain[0] == 8
    assert merged.pairs[1] is new_pair
    assert merged.pairs[0] is state.pairs[0] and merged.pairs[2] is state.pairs[2]
    assert torch.equal(merged.plain[1][1], torch.zeros(1))
    assert merged.plain[1][0] is state.plain[1][0]
    # the full state is not modified
    assert state.count == 4 and state.pairs[1] is not new_pair


def test_expand_state_fills_unselected_positions_with_none():
    part = _custom(size=2)
    full = expand_state(part, [3, 1], 5)
    assert type(full) is Custom and full.count == 4 and full.scale is part.scale
    assert _same(full.pairs, [None, part.pairs[1], None, part.pairs[0], None])
    assert _same(full.plain[1], [None, part.plain[1][1], None, part.plain[1][0], None])
    again = select_state(full, [3, 1])
    assert again.pairs[0] is part.pairs[0] and again.pairs[1] is part.pairs[1]


def test_expand_state_with_dict_state_keeps_keys():
    part = {"a": [torch.ones(1)], "b": 3}
    full = expand_state(part, [1], 2)
    assert list(full) == ["a", "b"] and full["b"] == 3
    assert _same(full["a"], [None, part["a"][0]])


# ----------------------------------------------------------------------------------------------
# flatten_state


def test_flatten_state_keys_come_from_named_chain_and_field_names():
    per_param, group = flatten_state(_tx().init(_params()), len(SHAPES))
    assert [sorted(entry) for entry in per_param] == [
        ["adam.mu", "adam.nu", "mom.momentum"],  # w1
        ["mom.momentum"],                         # b1: not selected by the mask
        ["adam.mu", "adam.nu", "mom.momentum"],  # w2
        ["mom.momentum"],                         # b2
    ]
    assert group == {"mom.count": 0, "adam.count": 0, "lr.count": 0,
                     "lr.hyperparams.learning_rate": 0.1}


def test_flatten_state_separates_per_param_tensors_from_group_values():
    state = _stepped_state()
    per_param, group = flatten_state(state, len(SHAPES))
    assert per_param[0]["mom.momentum"] is state["mom"].momentum[0]
    assert per_param[2]["adam.nu"] is state["adam"].nu[2]
    assert per_param[0]["mom.momentum"].shape == SHAPES["w1"]
    assert group["mom.count"] == 2 and group["adam.count"] == 2
    assert group["lr.hyperparams.learning_rate"] == pytest.approx(0.1 / 2)


def test_flatten_state_of_chain_uses_tuple_positions():
    tx = chain(trace(0.9), scale_by_adam())
    per_param, group = flatten_state(tx.init(_params()), len(SHAPES))
    assert sorted(per_param[1]) == ["0.momentum", "1.mu", "1.nu"]
    assert group == {"0.count": 0, "1.count": 0}


def test_flatten_state_nested_entries_and_plain_tuples():
    state = _custom()
    per_param, group = flatten_state(state, 3)
    assert sorted(per_param[2]) == ["pairs.first", "pairs.second", "plain.1"]
    assert per_param[2]["pairs.first"] is state.pairs[2].first
    assert per_param[1]["plain.1"] is state.plain[1][1]
    assert set(group) == {"count", "scale", "plain.0", "plain.2.0"}
    assert group["scale"] is state.scale and group["plain.0"] == 7


def test_flatten_state_prefix_is_prepended():
    per_param, group = flatten_state(chain(trace(0.9)).init(_params()), len(SHAPES), prefix="g")
    assert list(per_param[0]) == ["g.0.momentum"] and list(group) == ["g.0.count"]


@pytest.mark.parametrize("size", [3, 5])
def test_flatten_state_refuses_a_list_of_the_wrong_length(size):
    with pytest.raises(ValueError, match=f"has 4 entries for {size} parameters"):
        flatten_state(_stepped_state(), size)


def test_per_param_dict_entries_flatten_to_dotted_keys():
    state = {"pre": [{"left": torch.ones(2), "right": torch.zeros(2)} for _ in range(2)]}
    per_param, group = flatten_state(state, 2)
    assert sorted(per_param[0]) == ["pre.left", "pre.right"]
    template = {"pre": [{"left": torch.zeros(2, dtype=torch.float64),
                         "right": torch.zeros(2, dtype=torch.float64)} for _ in range(2)]}
    restored = unflatten_state(template, per_param, group)
    assert restored["pre"][1]["left"].dtype == torch.float64
    assert torch.equal(restored["pre"][1]["left"], torch.ones(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# unflatten_state


def test_unflatten_state_restores_saved_values():
    state = _stepped_state()
    per_param, group = flatten_state(state, len(SHAPES))
    restored = unflatten_state(_tx().init(_params()), per_param, group)
    per_b, group_b = flatten_state(restored, len(SHAPES))
    assert group_b == group
    for a, b in zip(per_param, per_b):
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k] is not b[k]
    assert restored["adam"].mu[1] is None and restored["adam"].mu[0] is not None


def test_unflatten_state_casts_to_template_dtype_and_copies():
    saved = _stepped_state(torch.float64)
    per_param, group = flatten_state(saved, len(SHAPES))
    template = _tx().init(_params(torch.float32))
    restored = unflatten_state(template, per_param, group)
    for i in range(len(SHAPES)):
        t, s = restored["mom"].momentum[i], saved["mom"].momentum[i]
        assert t.dtype == torch.float32 and t.device == template["mom"].momentum[i].device
        assert torch.equal(t, s.float())
    restored["mom"].momentum[0].add_(1.0)
    assert torch.equal(per_param[0]["mom.momentum"], saved["mom"].momentum[0])


def test_unflatten_state_casts_group_tensors_and_keeps_plain_values():
    state = _custom()
    per_param, group = flatten_state(state, 3)
    group = dict(group, scale=torch.tensor(4.0, dtype=torch.float64), count=9)
    template = _custom()._replace(scale=torch.tensor(0.0, dtype=torch.float16))
    restored = unflatten_state(template, per_param, group)
    assert restored.scale.dtype == torch.float16 and restored.scale.item() == 4.0
    assert restored.count == 9 and type(restored) is Custom
    assert type(restored.pairs[0]) is Pair and type(restored.plain) is tuple


def test_unflatten_state_accepts_numbers_for_tensor_entries():
    template = {"t": torch.zeros((), dtype=torch.float64), "p": [torch.zeros(())]}
    restored = unflatten_state(template, [{"p": 1.5}], {"t": 2})
    assert restored["t"].dtype == torch.float64 and restored["t"].item() == 2.0
    assert restored["p"][0].item() == 1.5


def test_unflatten_state_missing_per_param_key_raises_key_error_naming_it():
    per_param, group = flatten_state(_stepped_state(), len(SHAPES))
    del per_param[2]["adam.nu"]
    with pytest.raises(KeyError, match="adam.nu"):
        unflatten_state(_tx().init(_params()), per_param, group)


def test_unflatten_state_missing_group_key_raises_key_error_naming_it():
    per_param, group = flatten_state(_stepped_state(), len(SHAPES))
    del group["lr.hyperparams.learning_rate"]
    with pytest.raises(KeyError, match="lr.hyperparams.learning_rate"):
        unflatten_state(_tx().init(_params()), per_param, group)


def test_unflatten_state_shape_mismatch_raises_value_error_naming_the_key():
    per_param, group = flatten_state(_stepped_state(), len(SHAPES))
    per_param[1]["mom.momentum"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"'mom.momentum'.*\(7,\).*\(3,\)"):
        unflatten_state(_tx().init(_params()), per_param, group)


def test_unflatten_then_continue_gives_the_same_trajectory():
    tx = _tx()
    params_a, params_b = _params(), _params()
    state_a = tx.init(params_a)
    for step in range(2):
        _, state_a = tx.update(_grads(step), state_a, params_a)
    per_param, group = flatten_state(state_a, len(SHAPES))
    state_b = unflatten_state(tx.init(params_b), per_param, group)
    for step in range(2, 4):
        out_a, state_a = tx.update(_grads(step), state_a, params_a)
        out_b, state_b = tx.update(_grads(step), state_b, params_b)
        for k in SHAPES:
            assert torch.equal(out_a[k], out_b[k])
