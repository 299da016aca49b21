"""trace and ema (ALGORITHMS.md §0.6): optax parity, closed forms, validation."""

from __future__ import annotations

import doctest

import pytest
import torch

from gradchain.transforms import ema, momentum, trace

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Reference parity (optax, float64)

@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("decay", [0.9, 0.0, 0.5])
@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_matches_optax(decay, nesterov, kind, optax, assert_matches_optax):
    assert_matches_optax(trace(decay, nesterov=nesterov),
                         optax.trace(decay, nesterov=nesterov), kind=kind)


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("decay", [0.9, 0.0, 0.99])
@pytest.mark.parametrize("debias", [True, False])
def test_ema_matches_optax(decay, debias, kind, optax, assert_matches_optax):
    assert_matches_optax(ema(decay, debias=debias), optax.ema(decay, debias=debias), kind=kind)


# ---------------------------------------------------------------------------------------------
# Lending the buffer (the ``borrowed`` extra)

def test_trace_lends_its_buffer_only_to_a_caller_that_asks():
    tx = trace(0.9)
    u = [torch.ones(3, dtype=F64)]
    state = tx.init([torch.zeros(3, dtype=F64)])
    out, state = tx.update(u, state, grads=u)
    assert out[0] is not state.momentum[0]
    borrowed: set[int] = set()
    out, state = tx.update(u, state, grads=u, borrowed=borrowed)
    assert out[0] is state.momentum[0] and borrowed == {id(state.momentum[0])}
    torch.testing.assert_close(out[0], torch.full((3,), 1.9, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_member_after_a_lending_trace_copies_before_writing_into_it(nesterov):
    from gradchain.chains import chain
    from gradchain.transforms import scale, scale_by_learning_rate
    tx = chain(trace(0.9, nesterov=nesterov), scale(2.0), scale_by_learning_rate(0.5))
    params = [torch.zeros(3, dtype=F64)]
    lent, kept = tx.init(params), tx.init(params)
    for step in range(4):
        g = [torch.linspace(-1, 1, 3, dtype=F64) * (step + 1)]
        expected, kept = tx.update(g, kept, params)
        out, lent = tx.update(g, lent, params, borrowed=set())
        torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(lent[0].momentum[0], kept[0].momentum[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Closed forms

def _outputs(tx, inputs, shape=(2,)):
    state = tx.init([torch.zeros(shape, dtype=F64)])
    outs = []
    for u in inputs:
        out, state = tx.update([torch.as_tensor(u, dtype=F64).expand(shape).clone()], state)
        outs.append(out[0])
    return outs, state


def test_trace_of_a_constant_gradient_is_the_partial_geometric_sum():
    # b_t = 1 + mu + ... + mu^(t-1); mu = 0.5 keeps every value exact
    outs, state = _outputs(trace(0.5), [1.0] * 5)
    assert [o[0].item() for o in outs] == [1.0, 1.5, 1.75, 1.875, 1.9375]
    assert state.count == 5
    assert torch.equal(state.momentum[0], torch.full((2,), 1.9375, dtype=F64))


def test_nesterov_trace_of_a_constant_gradient_looks_one_step_ahead():
    # o_t = u + mu b_t = 1 + mu + ... + mu^t
    outs, _ = _outputs(trace(0.5, nesterov=True), [1.0] * 4)
    assert [o[0].item() for o in outs] == [1.5, 1.75, 1.875, 1.9375]


def test_trace_first_output_is_the_input_without_dampening():
    outs, _ = _outputs(trace(0.9), [3.0, 0.0])
    assert outs[0][0].item() == 3.0
    assert outs[1][0].item() == pytest.approx(2.7, rel=1e-15)


def test_trace_with_a_decay_schedule_reads_it_at_count():
    outs, _ = _outputs(trace(lambda count: 0.5 * count), [1.0, 1.0, 1.0])
    # mu = 0, 0.5, 1.0 at counts 0, 1, 2 : b = 1, 1.5, 2.5
    assert [o[0].item() for o in outs] == [1.0, 1.5, 2.5]


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_debiased_ema_of_a_constant_is_the_constant(decay):
    outs, _ = _outputs(ema(decay), [3.0] * 6)
    for o in outs:
        torch.testing.assert_close(o, torch.full((2,), 3.0, dtype=F64), rtol=1e-13, atol=0)


def test_ema_without_debias_of_a_constant_is_c_times_one_minus_beta_to_the_t():
    outs, _ = _outputs(ema(0.5, debias=False), [4.0] * 3)
    assert [o[0].item() for o in outs] == [2.0, 3.0, 3.5]


def test_debiased_ema_weights_inputs_by_normalised_powers():
    # t = 2: (beta (1-beta) u1 + (1-beta) u2) / (1 - beta^2) = (beta u1 + u2) / (1 + beta)
    outs, state = _outputs(ema(0.75), [2.0, -6.0])
    assert outs[1][0].item() == pytest.approx((0.75 * 2.0 - 6.0) / 1.75, rel=1e-15)
    assert state.count == 2
    # the state keeps the biased average
    assert state.ema[0][0].item() == pytest.approx(0.75 * 0.25 * 2.0 + 0.25 * -6.0, rel=1e-15)


def test_ema_output_does_not_alias_its_state():
    tx = ema(0.5)
    state = tx.init([torch.zeros(2)])
    out, state = tx.update([torch.ones(2)], state)
    out[0].fill_(100.0)
    out, state = tx.update([torch.ones(2)], state)
    assert torch.equal(out[0], torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize("make", [trace, ema], ids=["trace", "ema"])
@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, float("nan"), "0.9", None])
def test_momentum_rejects_invalid_decay(make, decay):
    with pytest.raises(ValueError, match="decay"):
        make(decay)


def test_debiased_ema_rejects_a_decay_schedule():
    with pytest.raises(ValueError, match="debias"):
        ema(lambda count: 0.9, debias=True)


def test_momentum_docstring_examples_run():
    result = doctest.testmod(momentum)
    assert result.attempted > 0 and result.failed == 0
