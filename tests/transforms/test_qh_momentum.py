"""qh_momentum (ALGORITHMS.md §3, §11 items 11-12): special cases against torch.optim.SGD's
buffers, bias corrections against hand recursions, contracts, validation."""

from __future__ import annotations

import pytest
import torch

from gradchain.chains.combinators import chain
from gradchain.core import select_state
from gradchain.transforms.basic import scale
from gradchain.transforms.momentum import qh_momentum

F64 = torch.float64
SHAPES = [(3, 4), (5,), ()]


def gradients(steps: int, seed: int = 0, shapes=SHAPES, dtype=F64) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=F64).to(dtype) for s in shapes]
            for _ in range(steps)]


def outputs(tx, grads_per_step):
    state = tx.init([torch.zeros_like(g) for g in grads_per_step[0]])
    outs = []
    for grads in grads_per_step:
        out, state = tx.update([g.clone() for g in grads], state)
        outs.append([o.clone() for o in out])
    return outs, state


def torch_sgd_directions(grads_per_step, beta: float, nesterov: bool):
    """The direction d_t that torch.optim.SGD(lr=1, momentum=beta, dampening=0) subtracts, and
    its momentum buffer b_t, at every step (the parameters are reset to 0 before each step, so
    the step is exactly -d_t)."""
    params = [torch.zeros_like(g, requires_grad=True) for g in grads_per_step[0]]
    opt = torch.optim.SGD(params, lr=1.0, momentum=beta, dampening=0.0, nesterov=nesterov)
    directions, buffers = [], []
    for grads in grads_per_step:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.zero_()
                p.grad = g.clone()
        opt.step()
        directions.append([-p.detach().clone() for p in params])
        buffers.append([opt.state[p]["momentum_buffer"].clone() for p in params])
    return directions, buffers


# ---------------------------------------------------------------------------------------------
# Special cases (§3.5) against torch.optim.SGD

@pytest.mark.parametrize("beta", [0.9, 0.5, 0.99])
def test_nu_one_without_correction_is_one_minus_beta_times_torch_momentum_buffer(beta):
    grads = gradients(12)
    outs, _ = outputs(qh_momentum(beta, nu=1.0, bias_correction="none"), grads)
    _, buffers = torch_sgd_directions(grads, beta, nesterov=False)
    for t, (out, buf) in enumerate(zip(outs, buffers)):
        for o, b in zip(out, buf):
            torch.testing.assert_close(o, (1 - beta) * b, rtol=1e-13, atol=1e-15,
                                       msg=f"step {t + 1}")


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_nu_beta_without_correction_is_one_minus_beta_times_torch_nesterov_direction(beta):
    grads = gradients(12, seed=1)
    outs, _ = outputs(qh_momentum(beta, nu=beta, bias_correction="none"), grads)
    directions, _ = torch_sgd_directions(grads, beta, nesterov=True)
    for t, (out, direction) in enumerate(zip(outs, directions)):
        for o, d in zip(out, direction):
            torch.testing.assert_close(o, (1 - beta) * d, rtol=1e-13, atol=1e-15,
                                       msg=f"step {t + 1}")


def test_nu_none_defaults_to_beta_nesterov():
    grads = gradients(6, seed=2)
    default, _ = outputs(qh_momentum(0.8), grads)
    explicit, _ = outputs(qh_momentum(0.8, nu=0.8), grads)
    for a, b in zip(default, explicit):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("correction", ["esgd", "qhadam", "none"])
def test_nu_zero_is_the_identity_at_every_step(correction):
    grads = gradients(5, seed=3)
    outs, state = outputs(qh_momentum(0.9, nu=0.0, bias_correction=correction), grads)
    for out, g in zip(outs, grads):
        for o, x in zip(out, g):
            assert torch.equal(o, x)
    assert state.count == 5


# ---------------------------------------------------------------------------------------------
# Bias corrections (§3.4, §11 item 11)

@pytest.mark.parametrize("beta,nu", [(0.9, 0.9), (0.999, 0.7), (0.5, 1.0), (0.9, 0.3)])
def test_esgd_correction_passes_a_constant_input_through_at_every_step(beta, nu):
    constant = [torch.tensor([3.0, -0.25], dtype=F64)]
    outs, _ = outputs(qh_momentum(beta, nu), [constant] * 30)
    for t, out in enumerate(outs):
        torch.testing.assert_close(out[0], constant[0], rtol=1e-13, atol=0,
                                   msg=f"step {t + 1}")


@pytest.mark.parametrize("correction", ["esgd", "qhadam"])
@pytest.mark.parametrize("nu", [0.0, 0.3, 0.9, 1.0])
def test_first_output_is_the_first_input(correction, nu):
    grads = gradients(1, seed=4)
    outs, _ = outputs(qh_momentum(0.9, nu, correction), grads)
    for o, g in zip(outs[0], grads[0]):
        torch.testing.assert_close(o, g, rtol=1e-14, atol=1e-15)


def hand_recursion(grads_per_step, beta, nu, correction):
    m = [torch.zeros_like(g) for g in grads_per_step[0]]
    outs = []
    for t, grads in enumerate(grads_per_step, start=1):
        m = [beta * mi + (1 - beta) * g for mi, g in zip(m, grads)]
        if correction == "qhadam":
            outs.append([nu * mi / (1 - beta ** t) + (1 - nu) * g for mi, g in zip(m, grads)])
        else:
            div = 1 - nu * beta ** t if correction == "esgd" else 1.0
            outs.append([(nu * mi + (1 - nu) * g) / div for mi, g in zip(m, grads)])
    return outs


@pytest.mark.parametrize("correction", ["esgd", "qhadam", "none"])
@pytest.mark.parametrize("beta,nu", [(0.9, 0.7), (0.999, 0.7), (0.6, 1.0)])
def test_outputs_follow_the_formula_of_each_correction(correction, beta, nu):
    grads = gradients(15, seed=5)
    outs, state = outputs(qh_momentum(beta, nu, correction), grads)
    expected = hand_recursion(grads, beta, nu, correction)
    for t, (out, ref) in enumerate(zip(outs, expected)):
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-14, msg=f"step {t + 1}")
    # the buffer is the plain (biased) EMA
    m_ref = [torch.zeros_like(g) for g in grads[0]]
    for step in grads:
        m_ref = [beta * m + (1 - beta) * g for m, g in zip(m_ref, step)]
    for m, r in zip(state.momentum, m_ref):
        torch.testing.assert_close(m, r, rtol=1e-12, atol=1e-14)


def test_esgd_and_qhadam_differ_between_the_first_step_and_the_limit():
    grads = gradients(3, seed=6)
    esgd, _ = outputs(qh_momentum(0.9, 0.7, "esgd"), grads)
    qhadam, _ = outputs(qh_momentum(0.9, 0.7, "qhadam"), grads)
    assert not torch.allclose(esgd[1][0], qhadam[1][0])


# ---------------------------------------------------------------------------------------------
# Contracts

@pytest.mark.parametrize("empty", [[], {}], ids=["list", "dict"])
def test_empty_tree_advances_count(empty):
    tx = qh_momentum()
    state = tx.init(type(empty)())
    for k in range(3):
        out, state = tx.update(type(empty)(), state)
        assert type(out) is type(empty) and len(out) == 0
        assert state.count == k + 1


@pytest.mark.parametrize("correction", ["esgd", "qhadam", "none"])
def test_list_and_dict_trees_give_the_same_values(correction):
    names = ["layer.weight", "layer.bias", "scale"]
    grads = gradients(4, seed=7)
    list_outs, _ = outputs(qh_momentum(0.9, 0.7, correction), grads)
    tx = qh_momentum(0.9, 0.7, correction)
    state = tx.init({n: torch.zeros_like(g) for n, g in zip(names, grads[0])})
    for k, step in enumerate(grads):
        out, state = tx.update(dict(zip(names, step)), state)
        assert type(out) is dict and list(out) == names
        for a, b in zip(out.values(), list_outs[k]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("correction", ["esgd", "qhadam", "none"])
@pytest.mark.parametrize("nu", [0.0, 0.7, 1.0])
def test_standalone_update_leaves_its_inputs_unmodified(correction, nu):
    tx = qh_momentum(0.9, nu, correction)
    state = tx.init([torch.zeros(3, dtype=F64)])
    for grads in gradients(3, seed=8, shapes=[(3,)]):
        before = grads[0].clone()
        tx.update(grads, state)
        assert torch.equal(grads[0], before)


@pytest.mark.parametrize("correction", ["esgd", "qhadam", "none"])
@pytest.mark.parametrize("nu", [0.7, 1.0])
def test_outputs_are_not_state_tensors(correction, nu):
    # a later transform may write into its input: scribbling over the output must not touch m
    grads = gradients(4, seed=9)
    clean, _ = outputs(qh_momentum(0.9, nu, correction), grads)
    tx = qh_momentum(0.9, nu, correction)
    state = tx.init([torch.zeros_like(g) for g in grads[0]])
    for k, step in enumerate(grads):
        out, state = tx.update([g.clone() for g in step], state)
        for o, c in zip(out, clean[k]):
            assert torch.equal(o, c), f"step {k + 1}"
            o.fill_(float("nan"))


def test_raw_gradient_is_not_overwritten_inside_a_chain():
    tx = chain(qh_momentum(0.9, 0.5), scale(2.0))
    grads = gradients(2, seed=10)
    state = tx.init([torch.zeros_like(g) for g in grads[0]])
    for step in grads:
        before = [g.clone() for g in step]
        tx.update(step, state)
        for g, b in zip(step, before):
            assert torch.equal(g, b)


def test_row_blocks_of_a_parameter_give_the_whole_result():
    # elementwise: the adapter may run a large parameter as blocks of rows, on state views
    grads = gradients(5, seed=11, shapes=[(6, 3)])
    whole, _ = outputs(qh_momentum(0.9, 0.7), grads)
    tx = qh_momentum(0.9, 0.7)
    state = tx.init([torch.zeros(6, 3, dtype=F64)])
    for k, step in enumerate(grads):
        pieces = []
        for rows in (slice(0, 4), slice(4, 6)):
            part = select_state(state, [0])
            part = part._replace(momentum=[part.momentum[0][rows]])
            out, after = tx.update([step[0][rows]], part)
            pieces.append(out[0])
        state = state._replace(count=after.count)
        torch.testing.assert_close(torch.cat(pieces), whole[k][0], rtol=0, atol=0)


def test_sixteen_bit_inputs_keep_a_float32_buffer():
    tx = qh_momentum(0.9)
    state = tx.init([torch.zeros(4, dtype=torch.bfloat16)])
    assert state.momentum[0].dtype == torch.float32
    out, state = chain(tx).update([torch.ones(4, dtype=torch.bfloat16)], (state,))
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], torch.ones(4))


def test_flags():
    tx = qh_momentum()
    assert tx.leafwise and tx.elementwise and not tx.terminal and tx.needs_hvp is None


# ---------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize("beta", [1.0, -0.1, float("nan"), "0.9", lambda c: 0.9])
def test_rejects_invalid_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        qh_momentum(beta)


@pytest.mark.parametrize("nu", [1.5, -0.1, float("nan"), "0.7", lambda c: 0.7])
def test_rejects_invalid_nu(nu):
    with pytest.raises(ValueError, match="nu"):
        qh_momentum(0.9, nu)


def test_accepts_the_ends_of_the_nu_interval_and_beta_zero():
    qh_momentum(0.0, 0.0)
    qh_momentum(0.9, 1.0)


def test_rejects_an_unknown_bias_correction():
    with pytest.raises(ValueError, match="bias_correction"):
        qh_momentum(0.9, 0.7, bias_correction="adam")
