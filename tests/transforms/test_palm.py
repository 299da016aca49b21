"""palm_beta2 (ALGORITHMS.md §4, §11 items 13-15): values, composition, no bias correction."""

from __future__ import annotations

import pytest
import torch

from gradchain.chains import chain, named_chain
from gradchain.core import debiased_decay, decay_product
from gradchain.optimizers import ChainOptimizer
from gradchain.chains import adamw
from gradchain.transforms import palm_beta2, scale_by_adam, scale_by_learning_rate, scale_by_rms

F64 = torch.float64

PALM_VALUES = {1: 0.0, 2: 0.4256508, 3: 0.5847564, 10: 0.8415107, 100: 0.9748811,
               1000: 0.9960189, 10 ** 4: 0.9993690}
HEAVYBALL_DEBIASED = {2: 0.2985660, 10: 0.8071737, 100: 0.9727397, 1000: 0.9959438}


@pytest.mark.parametrize("k", PALM_VALUES)
def test_beta2_at_the_kth_update(k):
    assert palm_beta2()(k - 1) == pytest.approx(PALM_VALUES[k], abs=5e-8)


@pytest.mark.parametrize("k", HEAVYBALL_DEBIASED)
def test_heavyball_debias_reproduces_its_table_and_plain_palm_needs_none(k):
    assert debiased_decay(palm_beta2(heavyball_debias=True), k - 1) == \
        pytest.approx(HEAVYBALL_DEBIASED[k], abs=5e-8)
    assert debiased_decay(palm_beta2(), k - 1) == pytest.approx(PALM_VALUES[k], abs=5e-8)
    assert decay_product(palm_beta2(), k - 1) == 0.0


def _second_moment(tx, grads):
    params = [torch.zeros_like(grads[0])]
    state = tx.init(params)
    seen = []
    for g in grads:
        _, state = tx.update([g.clone()], state, params)
        seen.append(state.nu[0].clone())
    return seen


def test_scale_one_is_the_arithmetic_mean_of_squares():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=gen, dtype=F64) for _ in range(12)]
    nus = _second_moment(scale_by_rms(palm_beta2(1.0), eps=0.0), grads)
    for k, nu in enumerate(nus, start=1):
        mean = torch.stack([g.square() for g in grads[:k]]).mean(0)
        torch.testing.assert_close(nu, mean, rtol=1e-14, atol=0)


def test_constant_square_gives_exactly_that_value_without_bias_correction():
    g = torch.tensor([3.0, -0.5, 2.0], dtype=F64)
    for nu in _second_moment(scale_by_rms(palm_beta2(), eps=0.0), [g] * 20):
        torch.testing.assert_close(nu, g.square(), rtol=1e-15, atol=0)


def test_adam_with_palm_applies_no_second_moment_correction():
    """At step 2 with b1 = 0: v = 0.4256508 g1² + 0.5743492 g2², o = g2 / sqrt(v)."""
    g1, g2 = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([3.0, -1.0], dtype=F64)
    tx = scale_by_adam(b1=0.0, b2=palm_beta2(), eps=0.0)
    state = tx.init([torch.zeros(2, dtype=F64)])
    _, state = tx.update([g1.clone()], state)
    (out,), _ = tx.update([g2.clone()], state)
    b = PALM_VALUES[2]
    torch.testing.assert_close(out, g2 / (b * g1.square() + (1 - b) * g2.square()).sqrt(),
                               rtol=1e-6, atol=0)


def test_chain_member_sets_the_decay_of_the_members_after_it_only():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, generator=gen, dtype=F64) for _ in range(8)]
    direct = chain(scale_by_adam(b2=palm_beta2()), scale_by_learning_rate(0.1))
    member = chain(palm_beta2(), scale_by_adam(), scale_by_learning_rate(0.1))
    before = chain(scale_by_adam(), palm_beta2(), scale_by_learning_rate(0.1))
    plain = chain(scale_by_adam(), scale_by_learning_rate(0.1))
    outs = {}
    for label, tx in dict(direct=direct, member=member, before=before, plain=plain).items():
        params = [torch.zeros(4, dtype=F64)]
        state, outs[label] = tx.init(params), []
        for g in grads:
            (o,), state = tx.update([g.clone()], state, params)
            outs[label].append(o)
    for a, b in zip(outs["direct"], outs["member"]):
        assert torch.equal(a, b)
    for a, b in zip(outs["before"], outs["plain"]):
        assert torch.equal(a, b)
    assert not torch.equal(outs["member"][3], outs["plain"][3])


def test_named_chain_member_keeps_no_state_and_no_checkpoint_entry():
    tx = named_chain(("b2", palm_beta2()), ("adam", scale_by_adam()))
    p = torch.nn.Parameter(torch.ones(3))
    opt = ChainOptimizer([p], tx)
    p.grad = torch.ones(3)
    opt.step()
    assert not [k for k in opt.state_dict()["state"][0] if k.startswith("b2")]


def test_as_a_group_hyperparameter_it_is_not_evaluated_at_the_group_step():
    """The adapter hands the schedule to the recipe as is, so its consumer evaluates it with
    its own count and skips the bias correction; the param group keeps the object."""
    p = torch.nn.Parameter(torch.ones(3, dtype=F64))
    q = torch.nn.Parameter(torch.ones(3, dtype=F64))
    ours = ChainOptimizer([p], adamw, lr=0.1, b2=palm_beta2(), weight_decay=0.0)
    reference = ChainOptimizer([q], chain(scale_by_adam(b2=palm_beta2()),
                                          scale_by_learning_rate(0.1)))
    for step in range(3):
        g = torch.tensor([1.0, -2.0, 0.5], dtype=F64) * (step + 1)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step(), reference.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert ours.param_groups[0]["b2"] == palm_beta2()


def test_validation_and_repr():
    with pytest.raises(ValueError, match="scale"):
        palm_beta2(0.0)
    assert repr(palm_beta2(0.5, heavyball_debias=True)) == "palm_beta2(0.5, heavyball_debias=True)"
