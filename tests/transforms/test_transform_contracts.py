"""Contracts every standard transform keeps (DESIGN.md "The core contract", core.py docstring,
ALGORITHMS.md §0.4, §0.5, §9.3), checked over one list of factories.

Sparse and complex updates: transforms that do nonlinear or stateful math (sign, moments,
clipping) raise ``ValueError`` naming themselves. The linear, stateless rescalings (``identity``,
``scale``, ``scale_by_learning_rate``, ``scale_by_schedule``) are exact on sparse and complex
tensors and pass them through; so is ``add_decayed_weights`` for complex tensors (u + λx is
linear), but it cannot add a dense parameter into a sparse gradient and must then say so.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradchain.core import EmptyState
from gradchain.transforms import (add_decayed_weights, clip, clip_by_agc, clip_by_global_norm,
                                  ema, identity, scale, scale_by_adam, scale_by_adam_inplace,
                                  scale_by_adopt, scale_by_laprop, scale_by_learning_rate,
                                  scale_by_rms, scale_by_rms_inplace, scale_by_schedule,
                                  scale_by_sign, soap_precondition, trace)

# id -> (factory, name the error messages must carry)
FACTORIES = {
    "identity": (identity, "identity"),
    "scale": (lambda: scale(0.37), "scale"),
    "scale_by_learning_rate": (lambda: scale_by_learning_rate(0.1), "scale_by_learning_rate"),
    "scale_by_learning_rate_schedule": (lambda: scale_by_learning_rate(lambda c: 0.1 / (1 + c)),
                                        "scale_by_learning_rate"),
    "scale_by_schedule": (lambda: scale_by_schedule(lambda c: 0.5 ** c), "scale_by_schedule"),
    "add_decayed_weights": (lambda: add_decayed_weights(0.1), "add_decayed_weights"),
    "add_decayed_weights_schedule": (lambda: add_decayed_weights(lambda c: 0.1 * (c + 1)),
                                     "add_decayed_weights"),
    "add_decayed_weights_masked": (lambda: add_decayed_weights(0.1, mask=lambda n, p: p.ndim > 0),
                                   "add_decayed_weights"),
    "scale_by_sign": (scale_by_sign, "scale_by_sign"),
    "trace": (lambda: trace(0.9), "trace"),
    "trace_nesterov": (lambda: trace(0.9, nesterov=True), "trace"),
    "ema": (lambda: ema(0.9), "ema"),
    "ema_biased": (lambda: ema(0.9, debias=False), "ema"),
    "scale_by_adam": (scale_by_adam, "scale_by_adam"),
    "scale_by_adam_nesterov_eps_root": (lambda: scale_by_adam(eps_root=1e-8, nesterov=True),
                                        "scale_by_adam"),
    "scale_by_rms": (scale_by_rms, "scale_by_rms"),
    "scale_by_rms_variant": (lambda: scale_by_rms(initial_scale=0.1, eps_in_sqrt=False,
                                                  bias_correction=True), "scale_by_rms"),
    "clip": (lambda: clip(0.5), "clip"),
    "clip_by_global_norm": (lambda: clip_by_global_norm(1.0), "clip_by_global_norm"),
    "clip_by_agc": (lambda: clip_by_agc(0.1), "clip_by_agc"),
    "scale_by_adam_inplace": (scale_by_adam_inplace, "scale_by_adam_inplace"),
    "scale_by_rms_inplace": (scale_by_rms_inplace, "scale_by_rms_inplace"),
    "scale_by_laprop": (scale_by_laprop, "scale_by_laprop"),
    "scale_by_adopt": (scale_by_adopt, "scale_by_adopt"),
    "scale_by_adopt_paper": (lambda: scale_by_adopt(style="paper"), "scale_by_adopt"),
    "soap_precondition": (lambda: soap_precondition(precondition_frequency=1),
                          "soap_precondition"),
}
ALL = list(FACTORIES)
NOT_LEAFWISE = {"clip_by_global_norm", "soap_precondition"}
LEAFWISE = [k for k in ALL if k not in NOT_LEAFWISE]

# first-call output of the linear transforms, u -> o (x: the parameters)
LINEAR_FIRST_STEP = {
    "identity": lambda u, x: u,
    "scale": lambda u, x: 0.37 * u,
    "scale_by_learning_rate": lambda u, x: -0.1 * u,
    "scale_by_learning_rate_schedule": lambda u, x: -0.1 * u,
    "scale_by_schedule": lambda u, x: u,
}
DECAY_FIRST_STEP = {k: (lambda u, x: u + 0.1 * x) for k in ALL if k.startswith("add_decayed")}
DENSE_ONLY = [k for k in ALL if k not in LINEAR_FIRST_STEP]
REAL_ONLY = [k for k in DENSE_ONLY if k not in DECAY_FIRST_STEP]

SHAPES = [(3, 4), (5,), ()]


def make(case):
    return FACTORIES[case][0]()


def rand(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def state_tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (list, tuple)):
        return [t for s in state for t in state_tensors(s)]
    if isinstance(state, dict):
        return [t for s in state.values() for t in state_tensors(s)]
    return []


def run(tx, grads_per_step, params, mutate_outputs=False):
    """Outputs (cloned) of successive updates; optionally scribble over each output after
    taking it, as a later transform of a chain is allowed to."""
    state = tx.init(params)
    outs = []
    for grads in grads_per_step:
        out, state = tx.update(grads, state, params)
        outs.append([o.clone() for o in (out.values() if isinstance(out, dict) else out)])
        if mutate_outputs:
            for o in (out.values() if isinstance(out, dict) else out):
                o.fill_(float("nan"))
    return outs, state


def steps(n=3, dtype=torch.float32, shapes=SHAPES):
    return [rand(shapes, dtype, seed=10 + k) for k in range(n)]


# ---------------------------------------------------------------------------------------------
# (a) structure


@pytest.mark.parametrize("case", ALL)
def test_list_and_dict_trees_come_back_with_the_same_structure_and_values(case):
    names = ["layer.weight", "layer.bias", "scale"]
    params = rand(seed=1)
    grads = steps()
    list_outs, _ = run(make(case), [list(g) for g in grads], list(params))
    tx = make(case)
    state = tx.init(dict(zip(names, params)))
    for k, g in enumerate(grads):
        out, state = tx.update(dict(zip(names, g)), state, dict(zip(names, params)))
        assert type(out) is dict and list(out) == names
        for name, a, b in zip(names, out.values(), list_outs[k]):
            assert a.shape == b.shape, name
            assert torch.equal(a, b), f"step {k}, {name}: list and dict results differ"


@pytest.mark.parametrize("case", ALL)
def test_list_tree_comes_back_as_a_list_of_the_same_shapes(case):
    tx = make(case)
    params = rand(seed=1)
    out, _ = tx.update(rand(seed=2), tx.init(params), params)
    assert type(out) is list and [o.shape for o in out] == [p.shape for p in params]


# ---------------------------------------------------------------------------------------------
# (b) empty trees


@pytest.mark.parametrize("empty", [[], {}], ids=["list", "dict"])
@pytest.mark.parametrize("case", ALL)
def test_empty_tree_is_accepted_and_advances_count(case, empty):
    tx = make(case)
    state = tx.init(type(empty)())
    for k in range(2):
        out, state = tx.update(type(empty)(), state, type(empty)())
        assert type(out) is type(empty) and len(out) == 0
        if "count" in getattr(state, "_fields", ()):
            assert state.count == k + 1


# ---------------------------------------------------------------------------------------------
# (c) ownership


@pytest.mark.parametrize("as_raw_grads", [False, True], ids=["standalone", "grads_extra"])
@pytest.mark.parametrize("case", ALL)
def test_update_never_modifies_the_tensors_passed_in(case, as_raw_grads):
    tx = make(case)
    params = rand(seed=1)
    params_before = [p.clone() for p in params]
    state = tx.init(params)
    for grads in steps():
        before = [g.clone() for g in grads]
        extras = {"grads": grads} if as_raw_grads else {}
        _, state = tx.update(grads, state, params, **extras)
        assert all(torch.equal(a, b) for a, b in zip(grads, before)), "updates were modified"
        assert all(torch.equal(a, b) for a, b in zip(params, params_before)), \
            "params were modified"


@pytest.mark.parametrize("case", ALL)
def test_outputs_are_handed_over_not_shared_with_the_state(case):
    # a later transform may write into our outputs: that must not change what we do next
    params = rand(seed=1)
    reference, _ = run(make(case), steps(4), params)
    scribbled, _ = run(make(case), steps(4), params, mutate_outputs=True)
    for k, (a, b) in enumerate(zip(reference, scribbled)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {k} changed"


@pytest.mark.parametrize("case", [k for k in ALL if "count" in getattr(
    make(k).init([torch.zeros(1)]), "_fields", ())])
def test_count_counts_completed_updates(case):
    tx = make(case)
    params = rand(seed=1)
    state = tx.init(params)
    assert state.count == 0
    for k, grads in enumerate(steps(3)):
        _, state = tx.update(grads, state, params)
        assert state.count == k + 1


# ---------------------------------------------------------------------------------------------
# (d) sparse and complex updates


def _sparse():
    return torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.5, -2.0]), (3,),
                                   check_invariants=True)


@pytest.mark.parametrize("case", DENSE_ONLY)
def test_sparse_updates_are_rejected_naming_the_transform(case):
    tx = make(case)
    params = [torch.ones(3)]
    with pytest.raises(ValueError, match=rf"{FACTORIES[case][1]} does not support sparse"):
        tx.update([_sparse()], tx.init(params), params)


@pytest.mark.parametrize("case", REAL_ONLY)
def test_complex_updates_are_rejected_naming_the_transform(case):
    tx = make(case)
    params = [torch.ones(3, dtype=torch.complex64)]
    with pytest.raises(ValueError, match=rf"{FACTORIES[case][1]} does not support complex"):
        tx.update([torch.tensor([1 + 2j, 0j, -3j], dtype=torch.complex64)], tx.init(params),
                  params)


@pytest.mark.parametrize("case", list(LINEAR_FIRST_STEP))
def test_linear_transforms_pass_sparse_updates_through_exactly(case):
    tx = make(case)
    params = [torch.ones(3)]
    out, _ = tx.update([_sparse()], tx.init(params), params)
    assert out[0].is_sparse
    expected = LINEAR_FIRST_STEP[case](_sparse().to_dense(), params[0])
    torch.testing.assert_close(out[0].to_dense(), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("case", list(LINEAR_FIRST_STEP) + list(DECAY_FIRST_STEP))
def test_linear_transforms_pass_complex_updates_through_exactly(case):
    tx = make(case)
    params = [torch.tensor([1j, 2.0, -1 - 1j], dtype=torch.complex128)]
    u = torch.tensor([1 + 2j, 0j, -3j], dtype=torch.complex128)
    out, _ = tx.update([u.clone()], tx.init(params), params)
    expected = {**LINEAR_FIRST_STEP, **DECAY_FIRST_STEP}[case](u, params[0])
    torch.testing.assert_close(out[0], expected, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# (e) dtypes


@pytest.mark.parametrize("case", ALL)
def test_float64_stays_float64(case):
    tx = make(case)
    params = rand(dtype=torch.float64, seed=1)
    state = tx.init(params)
    for grads in steps(2, torch.float64):
        out, state = tx.update(grads, state, params)
        assert [o.dtype for o in out] == [torch.float64] * len(SHAPES)
    assert all(t.dtype == torch.float64 for t in state_tensors(state) if t.is_floating_point())


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ALL)
def test_16bit_params_get_float32_state_and_float32_updates(case, low):
    tx = make(case)
    params = rand(dtype=low, seed=1)
    state = tx.init(params)
    assert all(t.dtype == torch.float32 for t in state_tensors(state) if t.is_floating_point())
    for grads in steps(2, torch.float32):
        out, state = tx.update(grads, state, params)
        assert [o.dtype for o in out] == [torch.float32] * len(SHAPES)
        assert all(bool(o.isfinite().all()) for o in out)
    assert all(t.dtype == torch.float32 for t in state_tensors(state) if t.is_floating_point())


def test_16bit_state_dtype_is_not_vacuous():
    # the dtype test above must look at real buffers for the stateful transforms
    for case in ["trace", "ema", "scale_by_adam", "scale_by_rms"]:
        assert len(state_tensors(make(case).init(rand(dtype=torch.bfloat16)))) >= len(SHAPES)


# ---------------------------------------------------------------------------------------------
# (f) foreach contract: a list at once = each tensor alone, bitwise (ALGORITHMS.md §9.3)


@pytest.mark.parametrize("case", LEAFWISE)
def test_whole_list_update_equals_per_tensor_updates_bitwise(case):
    params = rand(seed=1)
    grads = steps(4)
    together, _ = run(make(case), grads, params)
    for i in range(len(SHAPES)):
        alone, _ = run(make(case), [[g[i]] for g in grads], [params[i]])
        for k in range(len(grads)):
            assert torch.equal(together[k][i], alone[k][0]), f"leaf {i}, step {k}"


def test_global_norm_clipping_is_not_per_tensor():
    # the counterpart of the test above: why clip_by_global_norm is not leafwise
    params = [torch.zeros(1), torch.zeros(1)]
    grads = [[torch.tensor([3.0]), torch.tensor([4.0])]]
    together, _ = run(clip_by_global_norm(1.0), grads, params)
    alone, _ = run(clip_by_global_norm(1.0), [[grads[0][0]]], [params[0]])
    assert not torch.equal(together[0][0], alone[0][0])


# ---------------------------------------------------------------------------------------------
# (g) flags


@pytest.mark.parametrize("case", ALL)
def test_leafwise_flag_is_true_exactly_for_element_wise_transforms(case):
    tx = make(case)
    assert tx.leafwise is (case not in NOT_LEAFWISE)
    assert tx.terminal is False


@pytest.mark.parametrize("case", ["identity", "scale", "scale_by_sign", "clip",
                                  "clip_by_global_norm", "add_decayed_weights"])
def test_stateless_transforms_keep_an_empty_state(case):
    tx = make(case)
    params = rand(seed=1)
    state = tx.init(params)
    assert state == EmptyState()
    _, state = tx.update(rand(seed=2), state, params)
    assert state == EmptyState()


def test_non_finite_updates_propagate_through_elementwise_moments():
    # a NaN gradient entry poisons only its own entry of the output of element-wise transforms
    u = torch.tensor([float("nan"), 1.0])
    for case in ["trace", "ema", "scale_by_adam", "scale_by_rms"]:
        tx = make(case)
        out, _ = tx.update([u.clone()], tx.init([torch.zeros(2)]))
        assert math.isnan(out[0][0].item()) and math.isfinite(out[0][1].item()), case
