"""Tests for gradchain.schedules: closed forms, torch schedulers, ALGORITHMS.md §11 facts 34-36."""

from __future__ import annotations

import doctest
import math
from fractions import Fraction

import pytest
import torch

from gradchain import schedules
from gradchain.schedules import (constant_schedule, cosine_decay_schedule, exponential_decay,
                                 exponential_lr, join_schedules, linear_schedule,
                                 piecewise_constant_schedule, polynomial_schedule, sgdr_schedule,
                                 step_decay, warmup_cosine_decay_schedule)

SCHED = torch.optim.lr_scheduler


class DummyOptimizer(torch.optim.Optimizer):
    """Just the ``param_groups`` a torch scheduler reads and writes.

    ``Optimizer.__init__`` is skipped on purpose: it imports ``torch._dynamo`` (about 1 s).
    """

    def __init__(self, lr: float):
        self.defaults, self.param_groups, self.state = {"lr": lr}, [{"lr": lr}], {}

    def step(self, closure=None):
        return None


def torch_lrs(make_scheduler, epochs: int, lr: float = 1.0) -> list[float]:
    """Learning rates of a torch scheduler stepped once per epoch, for epochs 0..epochs-1."""
    opt = DummyOptimizer(lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def torch_sgdr_lr(epoch: float, t_0: int, t_mult: int, eta_min: float, lr: float = 1.0) -> float:
    """torch's CosineAnnealingWarmRestarts value at ``epoch``, set directly with step(epoch)."""
    opt = DummyOptimizer(lr)
    scheduler = SCHED.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult, eta_min=eta_min)
    opt.step()
    scheduler.step(epoch)
    return opt.param_groups[0]["lr"]


def test_docstring_examples_are_correct():
    result = doctest.testmod(schedules)
    assert result.attempted > 0 and result.failed == 0


def test_schedules_return_python_floats_for_int_arguments():
    fs = [constant_schedule(1), linear_schedule(1, 0, 4), step_decay(1, 2, 1),
          piecewise_constant_schedule(2, {1: 1}), sgdr_schedule(1, eta_min=0)]
    assert all(type(f(c)) is float for f in fs for c in (0, 1, 3, 10))


# ----------------------------------------------------------------------------------------------
# optax-style schedules


def test_constant_schedule_never_changes():
    f = constant_schedule(0.3)
    assert [f(c) for c in (0, 1, 10**9)] == [0.3, 0.3, 0.3]


def test_linear_schedule_is_constant_before_and_after_the_transition():
    f = linear_schedule(0.1, 0.3, transition_steps=8, transition_begin=4)
    assert [f(c) for c in (0, 3, 4)] == [0.1, 0.1, 0.1]           # before / at the start
    assert [f(c) for c in (12, 13, 1000)] == [0.3, 0.3, 0.3]      # at / after the end, exactly
    for c in range(4, 13):                                       # in between: exact rationals
        expected = Fraction(1, 10) + Fraction(2, 10) * Fraction(c - 4, 8)
        assert f(c) == pytest.approx(float(expected), rel=1e-15)


def test_polynomial_schedule_matches_hand_values():
    f = polynomial_schedule(2.0, 0.5, power=3, transition_steps=10, transition_begin=5)
    assert f(0) == f(5) == 2.0
    assert f(10) == 0.5 + 1.5 * 0.125                           # (1 - 5/10)^3 = 1/8
    assert f(13) == pytest.approx(0.5 + 1.5 * 0.2 ** 3, rel=1e-15)
    assert f(15) == f(16) == f(10**6) == 0.5


def test_polynomial_power_one_is_linear():
    p, q = polynomial_schedule(3.0, -1.0, 1, 7, 2), linear_schedule(3.0, -1.0, 7, 2)
    assert all(p(c) == pytest.approx(q(c), rel=1e-15) for c in range(12))


def test_exponential_decay_continuous_and_staircase():
    f = exponential_decay(2.0, transition_steps=4, decay_rate=0.5, transition_begin=3)
    assert f(0) == f(3) == 2.0                                   # nothing before transition_begin
    assert f(5) == pytest.approx(2.0 / math.sqrt(2), rel=1e-14)  # half a transition: rate^(1/2)
    assert f(7) == pytest.approx(1.0, rel=1e-15)
    assert f(11) == pytest.approx(0.5, rel=1e-15)
    s = exponential_decay(2.0, transition_steps=4, decay_rate=0.5, transition_begin=3,
                          staircase=True)
    assert [s(c) for c in (3, 4, 6, 7, 10, 11, 15)] == [2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.25]


def test_exponential_decay_end_value_is_a_lower_bound_when_decaying():
    f = exponential_decay(1.0, 1, 0.5, end_value=0.1)
    assert [f(c) for c in (0, 1, 2, 3, 4, 100)] == [1.0, 0.5, 0.25, 0.125, 0.1, 0.1]


def test_exponential_decay_end_value_is_an_upper_bound_when_growing():
    f = exponential_decay(1.0, 1, 2.0, end_value=5.0)
    assert [f(c) for c in (0, 1, 2, 3, 10**6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert exponential_decay(1.0, 1, 2.0)(10**6) == math.inf     # saturates, does not raise


def test_cosine_decay_matches_torch_cosine_annealing():
    init, steps, alpha = 0.4, 25, 0.1
    f = cosine_decay_schedule(init, steps, alpha=alpha)
    ref = torch_lrs(lambda o: SCHED.CosineAnnealingLR(o, T_max=steps, eta_min=alpha * init),
                    steps + 1, lr=init)
    assert [f(c) for c in range(steps + 1)] == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert f(steps) == pytest.approx(alpha * init, rel=1e-15)
    assert f(steps + 1) == f(10 * steps) == f(steps)             # constant after decay_steps


def test_cosine_decay_exponent():
    f = cosine_decay_schedule(2.0, 8, alpha=0.25, exponent=2.0)
    # at t = T/2 the cosine factor is 1/2, squared 1/4: 2 * (0.75 * 0.25 + 0.25)
    assert f(4) == pytest.approx(0.875, rel=1e-15)
    assert f(0) == 2.0


def test_warmup_cosine_hand_values_and_boundaries():
    f = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=4, decay_steps=12, end_value=0.2)
    assert [f(c) for c in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]  # warm-up, peak exactly at W
    assert f(8) == pytest.approx(0.6, rel=1e-15)                  # halfway down: (1 + 0.2) / 2
    assert f(12) == f(13) == f(1000) == 0.2                       # end_value exactly from D on


def test_warmup_cosine_is_optax_join_of_linear_and_cosine_decay():
    init, peak, end, warmup, total = 0.01, 0.5, 0.05, 5, 40
    f = warmup_cosine_decay_schedule(init, peak, warmup, total, end_value=end, exponent=1.5)
    ref = join_schedules([linear_schedule(init, peak, warmup),
                          cosine_decay_schedule(peak, total - warmup, end / peak, 1.5)], [warmup])
    assert [f(c) for c in range(50)] == pytest.approx([ref(c) for c in range(50)], rel=1e-13)


def test_warmup_cosine_without_warmup_starts_at_peak():
    f = warmup_cosine_decay_schedule(0.0, 2.0, warmup_steps=0, decay_steps=10)
    assert f(0) == 2.0 and f(5) == pytest.approx(1.0, rel=1e-15) and f(10) == 0.0


def test_piecewise_constant_scales_at_each_boundary():
    f = piecewise_constant_schedule(2.0, {10: 0.5, 3: 0.1, 20: 0.0})   # unsorted on purpose
    assert [f(c) for c in (0, 2, 3, 9, 10, 19, 20, 10**6)] == \
        [2.0, 2.0, 2.0 * 0.1, 2.0 * 0.1, 2.0 * 0.1 * 0.5, 2.0 * 0.1 * 0.5, 0.0, 0.0]
    assert piecewise_constant_schedule(1.5)(7) == 1.5
    assert piecewise_constant_schedule(1.0, {0: 3.0})(0) == 3.0


def test_join_schedules_restarts_the_count_at_each_boundary():
    seen = []

    def record(tag):
        return lambda c: seen.append((tag, c)) or float(c)

    f = join_schedules([record("a"), record("b"), record("c")], [3, 7])
    assert [f(c) for c in range(10)] == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    assert [tag for tag, _ in seen] == list("aaabbbbccc")


def test_join_schedules_equal_boundaries_skip_the_middle_schedule():
    f = join_schedules([constant_schedule(1.0), constant_schedule(2.0), constant_schedule(3.0)],
                       [4, 4])
    assert [f(c) for c in (3, 4, 5)] == [1.0, 3.0, 3.0]


# ----------------------------------------------------------------------------------------------
# Epoch schedules: torch / AdaTune baselines


def test_step_decay_matches_torch_step_lr():
    f = step_decay(0.5, step_size=3, gamma=0.7)
    ref = torch_lrs(lambda o: SCHED.StepLR(o, step_size=3, gamma=0.7), 40, lr=0.5)
    assert [f(c) for c in range(40)] == pytest.approx(ref, rel=1e-13)


def test_step_decay_counts_epochs_of_several_steps():
    f = step_decay(1.0, step_size=2, gamma=0.1, steps_per_epoch=5)     # stairs every 10 steps
    assert [f(c) for c in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01], rel=1e-15)


def test_exponential_lr_matches_torch_exponential_lr():
    f = exponential_lr(0.3, gamma=0.95)
    ref = torch_lrs(lambda o: SCHED.ExponentialLR(o, gamma=0.95), 60, lr=0.3)
    assert [f(c) for c in range(60)] == pytest.approx(ref, rel=1e-12)


def test_exponential_lr_fractional_epochs():
    f = exponential_lr(1.0, gamma=0.81, steps_per_epoch=4)
    assert f(2) == pytest.approx(0.9, rel=1e-15)                 # half an epoch: sqrt(0.81)
    assert f(4) == pytest.approx(0.81, rel=1e-15)
    assert f(6) == pytest.approx(0.81 * 0.9, rel=1e-15)


def test_adatune_default_gamma_one_is_constant():            # §11 fact 36
    fs = [step_decay(0.1, 30, 1.0), exponential_lr(0.1, 1.0), step_decay(0.1, 30, 1.0, 7),
          exponential_lr(0.1, 1.0, 7)]
    assert {f(c) for f in fs for c in (0, 29, 30, 31, 95, 1000)} == {0.1}


def test_staircase_fact_36():
    f = step_decay(2.0, step_size=30, gamma=0.5)
    assert [f(e) for e in (0, 29, 30, 59, 60, 90)] == [2.0, 2.0, 1.0, 1.0, 0.5, 0.25]


# ----------------------------------------------------------------------------------------------
# SGDR


def test_sgdr_fact_34_restarts_of_the_adatune_defaults():
    f = sgdr_schedule(1.0, t_0=10, t_mult=2, eta_min=1e-4)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.50005, rel=1e-15)
    for restart in (10, 30, 70, 150, 310):
        assert f(restart) == 1.0
        assert f(restart - 1) < 0.03                             # just before: near eta_min
    # T_i after each restart: halfway through the cycle the value is (eta0 + eta_min) / 2
    for restart, t_i in ((10, 20), (30, 40), (70, 80), (150, 160)):
        assert f(restart + t_i // 2) == pytest.approx(0.50005, rel=1e-12)


def test_sgdr_default_eta_min_is_1e_4_of_init():
    f, g = sgdr_schedule(2.0), sgdr_schedule(2.0, eta_min=2e-4)
    assert [f(c) for c in range(0, 200, 7)] == [g(c) for c in range(0, 200, 7)]
    assert f(5) == pytest.approx((2.0 + 2e-4) / 2, rel=1e-15)


def test_sgdr_fact_35_restart_at_1210_where_torch_misses_it():
    f = sgdr_schedule(1.0, t_0=10, t_mult=3, eta_min=1e-4)
    assert 10 * (3**5 - 1) // (3 - 1) == 1210                    # 1210 starts cycle n = 5
    assert f(1210) == 1.0
    assert f(1210 + 10 * 3**5 // 2) == pytest.approx(0.50005, rel=1e-12)
    # torch's float log puts e = 1210 at the end of cycle 4 instead; the test above would fail
    # for an implementation that copies it
    assert torch_sgdr_lr(1210, 10, 3, 1e-4) == pytest.approx(1e-4, rel=1e-9)


def test_sgdr_with_steps_per_epoch_restarts_on_the_exact_step():
    f = sgdr_schedule(1.0, t_0=10, t_mult=3, eta_min=0.0, steps_per_epoch=7)
    for restart_epoch in (10, 40, 130, 400, 1210, 3640):
        assert f(7 * restart_epoch) == 1.0
        assert f(7 * restart_epoch - 1) < 1e-3


def _reference_cycle(e: Fraction, t_0: int, t_mult: int) -> tuple[Fraction, int]:
    """(T_cur, T_i) by walking the cycles one by one, in exact arithmetic."""
    start, length = 0, t_0
    while start + length <= e:
        start, length = start + length, length * t_mult
    return e - start, length


@pytest.mark.parametrize("t_0, t_mult, per_epoch", [(10, 2, 1), (10, 3, 1), (3, 3, 4),
                                                   (5, 1, 3), (1, 4, 2)])
def test_sgdr_matches_walking_the_cycles(t_0, t_mult, per_epoch):
    f = sgdr_schedule(1.0, t_0, t_mult, eta_min=0.0, steps_per_epoch=per_epoch)
    for count in list(range(0, 400)) + [per_epoch * 1210, per_epoch * 3640, 10**5 + 3]:
        t_cur, t_i = _reference_cycle(Fraction(count, per_epoch), t_0, t_mult)
        expected = math.cos(math.pi * t_cur / (2 * t_i)) ** 2     # (1 + cos x)/2 = cos^2(x/2)
        assert f(count) == pytest.approx(expected, rel=1e-12, abs=1e-15), count


@pytest.mark.parametrize("t_0, t_mult", [(10, 2), (10, 3), (7, 1), (2, 5)])
def test_sgdr_matches_torch_at_non_boundary_epochs(t_0, t_mult):
    per_epoch, init, eta_min = 8, 0.3, 0.002
    f = sgdr_schedule(init, t_0, t_mult, eta_min=eta_min, steps_per_epoch=per_epoch)
    opt = DummyOptimizer(init)
    scheduler = SCHED.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult, eta_min=eta_min)
    opt.step()
    counts = [c for c in range(1, 12000, 37) if c % per_epoch]   # fractional epochs only
    for count in counts:
        scheduler.step(count / per_epoch)
        assert f(count) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), count


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("make, match", [
    (lambda: constant_schedule(float("nan")), "value must be a finite number"),
    (lambda: constant_schedule("0.1"), "value must be a finite number"),
    (lambda: linear_schedule(1.0, 0.0, 0), "transition_steps must be an integer > 0, got 0"),
    (lambda: linear_schedule(1.0, 0.0, 10, -1), "transition_begin must be an integer >= 0"),
    (lambda: linear_schedule(1.0, 0.0, 2.5), "transition_steps must be an integer"),
    (lambda: polynomial_schedule(1.0, 0.0, 0.0, 10), "power must be > 0"),
    (lambda: exponential_decay(1.0, 10, 0.0), "decay_rate must be > 0"),
    (lambda: exponential_decay(1.0, -3, 0.5), "transition_steps must be an integer > 0"),
    (lambda: exponential_decay(1.0, 10, 0.5, end_value=math.inf), "end_value must be a finite"),
    (lambda: step_decay(1.0, 0, 0.5), "step_size must be an integer > 0"),
    (lambda: step_decay(1.0, 30, -0.5), "gamma must be > 0"),
    (lambda: step_decay(1.0, 30, 0.5, steps_per_epoch=0), "steps_per_epoch must be an integer"),
    (lambda: exponential_lr(1.0, 0.0), "gamma must be > 0"),
    (lambda: cosine_decay_schedule(1.0, 0), "decay_steps must be an integer > 0, got 0"),
    (lambda: cosine_decay_schedule(1.0, 10, alpha=1.5), r"alpha must be in \[0, 1\]"),
    (lambda: cosine_decay_schedule(1.0, 10, exponent=0), "exponent must be > 0"),
    (lambda: warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), "decay_steps must be > warmup"),
    (lambda: warmup_cosine_decay_schedule(0.0, 1.0, -1, 10), "warmup_steps must be an integer"),
    (lambda: sgdr_schedule(1.0, t_0=0), "t_0 must be an integer > 0"),
    (lambda: sgdr_schedule(1.0, t_mult=1.5), "t_mult must be an integer > 0"),
    (lambda: sgdr_schedule(1.0, t_mult=0), "t_mult must be an integer > 0"),
    (lambda: sgdr_schedule(1.0, eta_min=float("nan")), "eta_min must be a finite number"),
    (lambda: sgdr_schedule(1.0, steps_per_epoch=True), "steps_per_epoch must be an integer"),
    (lambda: piecewise_constant_schedule(1.0, {5: -0.1}), "boundaries_and_scales scale"),
    (lambda: piecewise_constant_schedule(1.0, {-5: 0.1}), "boundaries_and_scales boundary"),
    (lambda: piecewise_constant_schedule(1.0, [(5, 0.1)]), "boundaries_and_scales must be a"),
    (lambda: join_schedules([], []), "schedules must be a non-empty"),
    (lambda: join_schedules([constant_schedule(1.0)] * 2, []), "boundaries must be of length"),
    (lambda: join_schedules([constant_schedule(1.0)] * 3, [5, 2]), "must be non-decreasing"),
    (lambda: join_schedules([constant_schedule(1.0), 0.5], [5]), "schedules must be"),
])
def test_invalid_arguments_raise_naming_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ----------------------------------------------------------------------------------------------
# precond_schedule (ALGORITHMS.md §5.8, §11 item 17)

PRECOND_TABLE = {  # k: (interval f(k), expected refreshes sum 1/f(j), deterministic count)
    10: (1.0000508, 9.99988, 9),
    100: (1.0260123, 99.1626, 99),
    1000: (2.0, 738.493, 738),
    10 ** 4: (14.318295, 2168.157, 2168),
    10 ** 5: (100.22903, 4049.641, 4049),
    10 ** 6: (513.0, 7245.352, 7245),
}


def test_precond_schedule_reproduces_the_seed_table():
    """The seed prints 10 for the first total: its rounding of 9.99988; accumulating 1/f and
    refreshing when the integer part grows gives the truncated counts."""
    f = schedules.precond_schedule()
    total, refreshes = 0.0, 0
    for k in range(1, 10 ** 6 + 1):
        new = total + 1.0 / f(k)
        refreshes += math.floor(new) > math.floor(total)
        total = new
        if k in PRECOND_TABLE:
            interval, expected, count = PRECOND_TABLE[k]
            assert f(k) == pytest.approx(interval, rel=1e-7)
            assert total == pytest.approx(expected, abs=1e-3)
            assert refreshes == count
    assert f"{PRECOND_TABLE[10][1]:.0f}" == "10"


def test_precond_schedule_pins_its_parameters_and_validates_them():
    assert schedules.precond_schedule(1.0, 1.0)(100) == pytest.approx(3.0)
    assert schedules.precond_schedule()(0) == schedules.precond_schedule()(1) == 1.0
    for bad in (dict(a=0.0), dict(b=-1.0), dict(a=float("nan"))):
        with pytest.raises(ValueError):
            schedules.precond_schedule(**bad)
