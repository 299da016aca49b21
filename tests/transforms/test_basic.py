"""identity, scale, scale_by_learning_rate, scale_by_schedule, add_decayed_weights and
scale_by_sign (ALGORITHMS.md §0.3, §0.6): optax parity, closed forms, masks, validation."""

from __future__ import annotations

import doctest

import pytest
import torch

from gradchain.core import apply_updates
from gradchain.transforms import (add_decayed_weights, basic, identity, scale,
                                  scale_by_learning_rate, scale_by_schedule, scale_by_sign)

F64 = torch.float64


def decaying(count):
    """A schedule that works on Python ints and on jax's int32 counters alike."""
    return 0.1 / (1.0 + 0.5 * count)


# ---------------------------------------------------------------------------------------------
# Reference parity (optax, float64)

@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("factor", [0.37, -2.0, 0.0])
def test_scale_matches_optax(factor, kind, optax, assert_matches_optax):
    assert_matches_optax(scale(factor), optax.scale(factor), kind=kind, rtol=0)


@pytest.mark.parametrize("learning_rate", [0.1, decaying], ids=["constant", "schedule"])
@pytest.mark.parametrize("flip_sign", [True, False])
def test_scale_by_learning_rate_matches_optax(learning_rate, flip_sign, optax,
                                              assert_matches_optax):
    assert_matches_optax(scale_by_learning_rate(learning_rate, flip_sign=flip_sign),
                         optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign))


def test_scale_by_schedule_matches_optax(optax, assert_matches_optax):
    assert_matches_optax(scale_by_schedule(decaying), optax.scale_by_schedule(decaying),
                         kind="dict")


def test_scale_by_sign_matches_optax(optax, assert_matches_optax):
    assert_matches_optax(scale_by_sign(), optax.scale_by_sign(), rtol=0)


@pytest.mark.parametrize("weight_decay", [0.1, 0.0, decaying], ids=["constant", "zero", "schedule"])
def test_add_decayed_weights_matches_optax(weight_decay, optax, assert_matches_optax):
    assert_matches_optax(add_decayed_weights(weight_decay),
                         optax.add_decayed_weights(weight_decay), kind="dict")


def test_masked_add_decayed_weights_matches_optax(optax, assert_matches_optax):
    # our name patterns versus optax's same-structure tree of bools
    assert_matches_optax(add_decayed_weights(0.3, mask=["w", "s"]),
                         optax.add_decayed_weights(0.3, mask={"w": True, "b": False, "s": True}),
                         kind="dict")


# ---------------------------------------------------------------------------------------------
# Closed forms (ALGORITHMS.md §0.3, §11.1)

def test_identity_returns_the_updates_unchanged():
    u = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor(3.0)}
    tx = identity()
    out, state = tx.update(u, tx.init(u))
    assert list(out) == ["a", "b"]
    assert all(torch.equal(out[k], u[k]) for k in u)


def test_learning_rate_negates_and_scales():
    u = [torch.tensor([1.0, -2.0, 0.5], dtype=F64)]
    out, _ = scale_by_learning_rate(0.25).update(u, scale_by_learning_rate(0.25).init(u))
    assert torch.equal(out[0], torch.tensor([-0.25, 0.5, -0.125], dtype=F64))


def test_learning_rate_without_sign_flip_keeps_the_sign():
    tx = scale_by_learning_rate(0.25, flip_sign=False)
    out, _ = tx.update([torch.tensor([1.0, -2.0])], tx.init([torch.zeros(2)]))
    assert torch.equal(out[0], torch.tensor([0.25, -0.5]))


def test_one_sgd_step_moves_params_by_minus_lr_times_gradient():
    # ALGORITHMS.md §11.1
    x = [torch.tensor([1.0, 2.0, -3.0], dtype=F64)]
    g = [torch.tensor([0.5, -4.0, 2.0], dtype=F64)]
    tx = scale_by_learning_rate(0.125)
    u, _ = tx.update(g, tx.init(x), x)
    apply_updates(x, u)
    assert torch.equal(x[0], torch.tensor([1.0 - 0.0625, 2.0 + 0.5, -3.0 - 0.25], dtype=F64))


def test_learning_rate_schedule_is_read_at_count_0_1_2():
    seen = []
    tx = scale_by_learning_rate(lambda count: seen.append(count) or 2.0 ** -count)
    state = tx.init([torch.zeros(1)])
    outs = []
    for _ in range(3):
        out, state = tx.update([torch.ones(1)], state)
        outs.append(out[0].item())
    assert seen == [0, 1, 2]
    assert outs == [-1.0, -0.5, -0.25]


def test_scale_by_schedule_multiplies_without_sign_change():
    tx = scale_by_schedule(lambda count: count + 0.5)
    state = tx.init([torch.zeros(2)])
    outs = []
    for _ in range(3):
        out, state = tx.update([torch.tensor([2.0, -2.0])], state)
        outs.append(out[0].tolist())
    assert outs == [[1.0, -1.0], [3.0, -3.0], [5.0, -5.0]]
    assert state.count == 3


def test_scale_by_sign_maps_to_minus_one_zero_one():
    tx = scale_by_sign()
    out, _ = tx.update([torch.tensor([-3.0, -1e-30, 0.0, -0.0, 2e-30, 7.0])],
                       tx.init([torch.zeros(6)]))
    assert out[0].tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]


def test_add_decayed_weights_adds_lambda_times_params():
    u = [torch.tensor([1.0, -1.0], dtype=F64)]
    x = [torch.tensor([2.0, 4.0], dtype=F64)]
    tx = add_decayed_weights(0.25)
    out, _ = tx.update(u, tx.init(x), x)
    assert torch.equal(out[0], torch.tensor([1.5, 0.0], dtype=F64))


def test_add_decayed_weights_schedule_is_read_at_count_0_1():
    tx = add_decayed_weights(lambda count: 0.5 * (count + 1))
    x = [torch.tensor([2.0])]
    state = tx.init(x)
    out1, state = tx.update([torch.zeros(1)], state, x)
    out2, state = tx.update([torch.zeros(1)], state, x)
    assert (out1[0].item(), out2[0].item(), state.count) == (1.0, 2.0, 2)


def test_add_decayed_weights_without_params_names_the_fix():
    tx = add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="add_decayed_weights needs the parameters"):
        tx.update([torch.ones(2)], tx.init([torch.ones(2)]))


# ---------------------------------------------------------------------------------------------
# add_decayed_weights masks

def _named():
    params = {"layer.weight": torch.full((2, 2), 2.0), "layer.bias": torch.full((2,), 4.0),
              "emb.weight": torch.full((3,), 8.0)}
    updates = {k: torch.ones_like(v) for k, v in params.items()}
    return params, updates


def _decayed_names(out):
    return sorted(k for k, v in out.items() if not torch.equal(v, torch.ones_like(v)))


@pytest.mark.parametrize("mask, decayed", [
    (["*.weight"], ["emb.weight", "layer.weight"]),
    (["layer.*"], ["layer.bias", "layer.weight"]),
    (["emb.weight"], ["emb.weight"]),
    ({"*.bias": False, "*": True}, ["emb.weight", "layer.weight"]),
    (lambda name, p: p.ndim >= 2, ["layer.weight"]),
    (lambda name, p: name.startswith("emb"), ["emb.weight"]),
], ids=["pattern", "prefix_pattern", "exact_name", "mapping", "predicate_ndim",
        "predicate_name"])
def test_add_decayed_weights_mask_selects_named_parameters(mask, decayed):
    params, updates = _named()
    tx = add_decayed_weights(0.5, mask=mask)
    out, _ = tx.update(updates, tx.init(params), params)
    assert list(out) == list(params)
    assert _decayed_names(out) == decayed
    for name in decayed:  # 1 + 0.5 x
        assert torch.equal(out[name], 1.0 + 0.5 * params[name])


def test_add_decayed_weights_empty_pattern_list_decays_nothing():
    params, updates = _named()
    tx = add_decayed_weights(0.5, mask=[])
    out, _ = tx.update(updates, tx.init(params), params)
    assert _decayed_names(out) == []


def test_add_decayed_weights_mask_of_bools_on_a_list():
    params = [torch.full((2,), 2.0), torch.full((3,), 4.0), torch.full((1,), 8.0)]
    tx = add_decayed_weights(0.5, mask=[True, False, True])
    out, _ = tx.update([torch.ones_like(p) for p in params], tx.init(params), params)
    assert [o.tolist() for o in out] == [[2.0, 2.0], [1.0, 1.0, 1.0], [5.0]]


def test_add_decayed_weights_mask_of_bools_on_a_dict_is_rejected():
    params, updates = _named()
    tx = add_decayed_weights(0.5, mask=[True, False, True])
    with pytest.raises(ValueError, match="named"):
        tx.update(updates, tx.init(params), params)


def test_add_decayed_weights_mask_of_wrong_length_is_rejected():
    params = [torch.ones(2), torch.ones(3)]
    tx = add_decayed_weights(0.5, mask=[True, False, True])
    with pytest.raises(ValueError, match="3 entries for 2 parameters"):
        tx.update([torch.ones(2), torch.ones(3)], tx.init(params), params)


def test_add_decayed_weights_mapping_without_a_match_names_the_parameter():
    params, updates = _named()
    tx = add_decayed_weights(0.5, mask={"*.weight": True})
    with pytest.raises(ValueError, match="layer.bias"):
        tx.update(updates, tx.init(params), params)


# ---------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize("make, name", [
    (lambda: scale_by_learning_rate(-0.1), "learning_rate"),
    (lambda: scale_by_learning_rate(float("nan")), "learning_rate"),
    (lambda: scale_by_learning_rate("0.1"), "learning_rate"),
    (lambda: scale_by_learning_rate(None), "learning_rate"),
    (lambda: add_decayed_weights(-1e-4), "weight_decay"),
    (lambda: add_decayed_weights(float("nan")), "weight_decay"),
    (lambda: add_decayed_weights("0.1"), "weight_decay"),
    (lambda: scale_by_schedule(0.5), "schedule"),
    (lambda: scale(lambda count: 1.0), "scale_by_schedule"),
], ids=["lr_negative", "lr_nan", "lr_string", "lr_none", "wd_negative", "wd_nan", "wd_string",
        "schedule_number", "scale_schedule"])
def test_basic_transforms_reject_invalid_hyperparameter(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("factor", [float("nan"), "0.5", None])
def test_scale_rejects_nan_and_non_numbers(factor):
    with pytest.raises(ValueError, match="factor"):
        scale(factor)


@pytest.mark.parametrize("value", [0.0, 0, torch.tensor(0.1)])
def test_zero_and_tensor_learning_rates_are_accepted(value):
    tx = scale_by_learning_rate(value)
    out, _ = tx.update([torch.ones(2)], tx.init([torch.ones(2)]))
    torch.testing.assert_close(out[0], -float(value) * torch.ones(2))


def test_basic_docstring_examples_run():
    result = doctest.testmod(basic)
    assert result.attempted > 0 and result.failed == 0
