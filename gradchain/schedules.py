r"""Step-size schedules: plain functions of the step count.

A schedule is any callable ``f(count) -> float`` of the 0-based ``count``, the number of updates
already applied (ALGORITHMS.md §0.4). Pass one wherever a transform accepts a number or a
schedule, e.g. ``scale_by_learning_rate(cosine_decay_schedule(0.1, 1000))``.

Every factory here checks its arguments, then returns a small closure that does float64
arithmetic in Python and returns a Python ``float``. Integer quantities (boundaries, staircase
indices, SGDR cycle indices) are computed with integer arithmetic, so restarts and stairs fall
exactly on the step where they belong.

Two families live here:

* optax-style step schedules: :func:`constant_schedule`, :func:`linear_schedule`,
  :func:`polynomial_schedule`, :func:`exponential_decay`, :func:`cosine_decay_schedule`,
  :func:`warmup_cosine_decay_schedule`, :func:`piecewise_constant_schedule`,
  :func:`join_schedules` (same arguments and values as optax);
* :func:`precond_schedule`, SOAP's preconditioner-refresh interval, a function of the 1-based
  update index k (not of ``count``);
* epoch schedules after torch's ``StepLR``, ``ExponentialLR`` and ``CosineAnnealingWarmRestarts``
  (AdaTune's baselines, §8.6): :func:`step_decay`, :func:`exponential_lr`, :func:`sgdr_schedule`,
  where the epoch is ``e = count / steps_per_epoch`` and may be fractional. Unlike AdaTune's
  training loop they have no one-epoch lag: ``count`` maps straight to ``e``.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

from gradchain.core import Schedule

__all__ = [
    "constant_schedule",
    "linear_schedule",
    "polynomial_schedule",
    "exponential_decay",
    "step_decay",
    "exponential_lr",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "sgdr_schedule",
    "piecewise_constant_schedule",
    "join_schedules",
    "sm3_warmup_cooldown",
    "precond_schedule",
]


# ----------------------------------------------------------------------------------------------
# Argument checks


def _fail(name: str, rule: str, value: Any) -> None:
    raise ValueError(f"{name} must be {rule}, got {value!r}")


def _real(name: str, value: Any, rule: str = "a finite number") -> float:
    """``value`` as a float; ``ValueError`` unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        _fail(name, rule, value)
    return float(value)


def _positive(name: str, value: Any) -> float:
    value = _real(name, value, "a finite number > 0")
    if not value > 0:
        _fail(name, "> 0", value)
    return value


def _integer(name: str, value: Any, low: int) -> int:
    """``value`` as an int; ``ValueError`` unless it is an integer ``>= low``."""
    rule = "an integer > 0" if low == 1 else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        _fail(name, rule, value)
    return int(value)


def _times_power(scale: float, base: float, exponent: float) -> float:
    """``scale * base ** exponent`` for ``base > 0``, saturating to ±inf instead of raising."""
    try:
        return scale * base ** exponent
    except OverflowError:                                   # e.g. 2.0 ** 5000.0
        return math.copysign(math.inf, scale) if scale else 0.0


# ----------------------------------------------------------------------------------------------
# optax-style schedules


def constant_schedule(value: float) -> Schedule:
    r"""The same value at every step: :math:`\eta_t = v`.

    Example:
        >>> constant_schedule(0.1)(1000)
        0.1
    """
    value = _real("value", value)
    return lambda count: value


def polynomial_schedule(init_value: float, end_value: float, power: float,
                        transition_steps: int, transition_begin: int = 0) -> Schedule:
    r"""Polynomial interpolation from ``init_value`` to ``end_value``.

    With :math:`T` = ``transition_steps`` and :math:`\tau = \min(\max(t - t_0, 0), T)`, where
    :math:`t_0` = ``transition_begin``:

    .. math::
        \eta_t = \eta_{\text{end}} + (\eta_{\text{init}} - \eta_{\text{end}})
                 \,(1 - \tau / T)^{p}

    so ``init_value`` up to step :math:`t_0` and ``end_value`` from step :math:`t_0 + T` on
    (both returned exactly). ``power`` :math:`p > 0`; ``p = 1`` is :func:`linear_schedule`.

    Example:
        >>> f = polynomial_schedule(1.0, 0.0, power=2, transition_steps=4)
        >>> [f(k) for k in range(6)]
        [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    init = _real("init_value", init_value)
    end = _real("end_value", end_value)
    power = _positive("power", power)
    steps = _integer("transition_steps", transition_steps, 1)
    begin = _integer("transition_begin", transition_begin, 0)

    def schedule(count: int) -> float:
        tau = count - begin
        if tau <= 0:
            return init
        if tau >= steps:
            return end
        return end + (init - end) * (1.0 - tau / steps) ** power

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int,
                    transition_begin: int = 0) -> Schedule:
    r"""Linear interpolation from ``init_value`` to ``end_value``, constant outside.

    .. math::
        \eta_t = \eta_{\text{init}} + (\eta_{\text{end}} - \eta_{\text{init}})
                 \,\min(\max(t - t_0, 0), T) / T

    with :math:`T` = ``transition_steps`` (> 0) and :math:`t_0` = ``transition_begin``
    (default 0).

    Example:
        >>> f = linear_schedule(0.0, 1.0, transition_steps=4, transition_begin=2)
        >>> [f(k) for k in range(8)]
        [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return polynomial_schedule(init_value, end_value, 1, transition_steps, transition_begin)


def exponential_decay(init_value: float, transition_steps: int, decay_rate: float,
                      transition_begin: int = 0, staircase: bool = False,
                      end_value: float | None = None) -> Schedule:
    r"""Exponential decay (or growth) by ``decay_rate`` every ``transition_steps`` steps.

    .. math::
        \eta_t = \eta_0 \, r^{p}, \qquad p = \frac{\max(t - t_0, 0)}{T}
        \quad (\lfloor p \rfloor \text{ if staircase})

    with :math:`r` = ``decay_rate`` (> 0), :math:`T` = ``transition_steps`` (> 0) and
    :math:`t_0` = ``transition_begin`` (default 0). If ``end_value`` is given it bounds the value:
    from below when ``r < 1``, from above when ``r > 1``. Growth past the float range gives ±inf.

    Example:
        >>> f = exponential_decay(1.0, transition_steps=2, decay_rate=0.5, staircase=True)
        >>> [f(k) for k in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        >>> exponential_decay(1.0, 1, 0.5, end_value=0.2)(10)
        0.2
    """
    init = _real("init_value", init_value)
    steps = _integer("transition_steps", transition_steps, 1)
    rate = _positive("decay_rate", decay_rate)
    begin = _integer("transition_begin", transition_begin, 0)
    bound = None if end_value is None else _real("end_value", end_value)
    clamp = max if rate < 1 else min

    def schedule(count: int) -> float:
        tau = count - begin
        if tau <= 0:
            return init
        exponent = tau // steps if staircase else tau / steps
        value = _times_power(init, rate, exponent)
        return value if bound is None else clamp(value, bound)

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0,
                          exponent: float = 1.0) -> Schedule:
    r"""Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps`` steps.

    .. math::
        \eta_t = \eta_0 \left[(1 - \alpha)
                 \left(\tfrac12\bigl(1 + \cos(\pi \min(t, T) / T)\bigr)\right)^{k} + \alpha\right]

    with :math:`T` = ``decay_steps`` (> 0), :math:`\alpha \in [0, 1]` (default 0) and
    :math:`k` = ``exponent`` (> 0, default 1). Constant after step :math:`T`. With ``k = 1`` this
    is torch's ``CosineAnnealingLR(T_max=T, eta_min=alpha * init_value)`` for ``t <= T``.

    Example:
        >>> f = cosine_decay_schedule(1.0, decay_steps=4)
        >>> [round(f(k), 6) for k in range(6)]
        [1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0]
    """
    init = _real("init_value", init_value)
    steps = _integer("decay_steps", decay_steps, 1)
    alpha = _real("alpha", alpha, "in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        _fail("alpha", "in [0, 1]", alpha)
    exponent = _positive("exponent", exponent)

    def schedule(count: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(count, steps) / steps))
        return init * ((1.0 - alpha) * cosine ** exponent + alpha)

    return schedule


def warmup_cosine_decay_schedule(init_value: float, peak_value: float, warmup_steps: int,
                                 decay_steps: int, end_value: float = 0.0,
                                 exponent: float = 1.0) -> Schedule:
    r"""Linear warm-up to ``peak_value``, then cosine decay to ``end_value``.

    With :math:`W` = ``warmup_steps`` (>= 0) and :math:`D` = ``decay_steps`` (> W), the *total*
    length including the warm-up (optax's convention):

    .. math::
        \eta_t = \begin{cases}
            \eta_{\text{init}} + (\eta_{\text{peak}} - \eta_{\text{init}})\, t / W & t < W \\
            \eta_{\text{end}} + (\eta_{\text{peak}} - \eta_{\text{end}})\, c_t^{k} & t \ge W
        \end{cases}, \qquad
        c_t = \tfrac12\Bigl(1 + \cos\frac{\pi \min(t - W,\, D - W)}{D - W}\Bigr)

    ``exponent`` :math:`k` > 0 (default 1); ``end_value`` defaults to 0.

    Example:
        >>> f = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=4)
        >>> [round(f(k), 6) for k in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    init = _real("init_value", init_value)
    peak = _real("peak_value", peak_value)
    end = _real("end_value", end_value)
    warmup = _integer("warmup_steps", warmup_steps, 0)
    total = _integer("decay_steps", decay_steps, 1)
    if total <= warmup:
        _fail("decay_steps", f"> warmup_steps = {warmup}", total)
    exponent = _positive("exponent", exponent)
    length = total - warmup

    def schedule(count: int) -> float:
        if count < warmup:
            return init + (peak - init) * count / warmup
        w = (0.5 * (1.0 + math.cos(math.pi * min(count - warmup, length) / length))) ** exponent
        return peak * w + end * (1.0 - w)            # exactly peak at t = W, end at t >= D

    return schedule


def piecewise_constant_schedule(init_value: float,
                                boundaries_and_scales: Mapping[int, float] | None = None
                                ) -> Schedule:
    r"""Piecewise constant: multiply by ``scale`` from each boundary on.

    .. math::
        \eta_t = \eta_0 \prod_{b \le t} s_b

    for the ``{b: s_b}`` pairs of ``boundaries_and_scales`` (integer boundaries >= 0,
    scales >= 0). A boundary takes effect *at* step ``b`` (optax semantics). ``None`` or an empty
    mapping gives a constant schedule.

    Example:
        >>> f = piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
        >>> [f(k) for k in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    value = _real("init_value", init_value)
    pairs = {} if boundaries_and_scales is None else boundaries_and_scales
    if not isinstance(pairs, Mapping):
        _fail("boundaries_and_scales", "a mapping {boundary: scale}", pairs)
    boundaries, values = [], [value]
    for boundary, scale in sorted((_integer("boundaries_and_scales boundary", b, 0), s)
                                  for b, s in pairs.items()):
        boundaries.append(boundary)
        scale = _real("boundaries_and_scales scale", scale, "a finite number >= 0")
        if scale < 0:
            _fail("boundaries_and_scales scale", ">= 0", scale)
        values.append(values[-1] * scale)

    return lambda count: values[bisect_right(boundaries, count)]


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""Run ``schedules[i]`` from ``boundaries[i-1]`` on, restarting its count there.

    .. math::
        \eta_t = f_i(t - b_{i-1}) \quad \text{for } b_{i-1} \le t < b_i,
        \qquad b_{-1} = 0,\ b_n = \infty

    ``boundaries`` is non-decreasing with one entry fewer than ``schedules`` (optax semantics;
    the first schedule sees the raw count).

    Example:
        >>> f = join_schedules([constant_schedule(0.0), linear_schedule(0.0, 1.0, 2)], [3])
        >>> [f(k) for k in range(6)]
        [0.0, 0.0, 0.0, 0.0, 0.5, 1.0]
    """
    schedules = list(schedules)
    boundaries = [_integer("boundaries", b, 0) for b in boundaries]
    if not schedules or not all(callable(f) for f in schedules):
        _fail("schedules", "a non-empty sequence of callables", schedules)
    if len(boundaries) != len(schedules) - 1:
        _fail("boundaries", f"of length len(schedules) - 1 = {len(schedules) - 1}", boundaries)
    if any(a > b for a, b in zip(boundaries, boundaries[1:])):
        _fail("boundaries", "non-decreasing", boundaries)
    starts = [0] + boundaries

    def schedule(count: int) -> float:
        i = bisect_right(boundaries, count)
        return schedules[i](count - starts[i])

    return schedule


def sm3_warmup_cooldown(peak_value: float, warmup_steps: int, total_steps: int | None,
                        power: float = 2.0, cooldown_fraction: float = 0.1) -> Schedule:
    r"""SM3 authors' advice (ALGORITHMS.md §8.2): a polynomial warm-up, then constant, then a
    linear cool-down to 0 over the last ``cooldown_fraction`` of the steps.

    .. math::
        \eta_t = \eta_{\text{peak}} \max\Bigl(0, \min\Bigl(1, (t / W)^{p},
                  \frac{T - t}{f\,T}\Bigr)\Bigr)

    with :math:`W` = ``warmup_steps`` (>= 0; 0 means no warm-up), :math:`T` = ``total_steps``
    (> 0 and >= W; ``None`` means no cool-down), :math:`p` = ``power`` (> 0; 2 is the authors'
    quadratic ramp, 1 a linear one) and :math:`f` = ``cooldown_fraction`` in (0, 1]. With the
    0-based count the first value is 0 (the first step is a no-op when W > 0), and the
    :math:`\max(0, \cdot)` keeps steps beyond T at 0. The cool-down is the authors' memory-free
    alternative to Polyak averaging; there is no other decay.

    Example:
        >>> f = sm3_warmup_cooldown(1.0, warmup_steps=2, total_steps=10, cooldown_fraction=0.2)
        >>> [f(k) for k in range(12)]
        [0.0, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    """
    peak = _real("peak_value", peak_value)
    warmup = _integer("warmup_steps", warmup_steps, 0)
    total = None if total_steps is None else _integer("total_steps", total_steps, 1)
    power = _positive("power", power)
    fraction = _positive("cooldown_fraction", cooldown_fraction)
    if fraction > 1.0:
        _fail("cooldown_fraction", "in (0, 1]", cooldown_fraction)
    if total is not None and warmup > total:
        _fail("warmup_steps", f"<= total_steps = {total}", warmup_steps)

    def schedule(count: int) -> float:
        factor = 1.0
        if count < warmup:
            factor = (count / warmup) ** power
        if total is not None:
            factor = min(factor, (total - count) / (fraction * total))
        return peak * max(0.0, factor)

    return schedule


def precond_schedule(a: float = 1.0 / 3.0, b: float = 9.0) -> Schedule:
    r"""SOAP's preconditioner-refresh interval (HeavyBall's ``precond_scheduler``, §5.8).

    .. math::  f(k) = 1 + \bigl(a \log_{10} \max(k, 1)\bigr)^{b}

    is the expected number of updates between two refreshes of the eigenbases at the 1-based
    update index k. ``soap_precondition(precondition_frequency=precond_schedule())`` adds
    :math:`1/f(k)` to an accumulator at every update and refreshes whenever its integer part
    grows, so that after k updates it has refreshed exactly :math:`\lfloor\sum_{j \le k}
    1/f(j)\rfloor` times, deterministically. With the defaults a = 1/3, b = 9 it refreshes at
    almost every step for the first hundred steps, every 2 at k = 1000, every 14 at 10^4 and
    every 513 at 10^6 (7245 refreshes in a million steps instead of 500000 every 2 steps).

    Example:
        >>> f = precond_schedule()
        >>> [round(f(k), 4) for k in (10, 100, 1000, 10 ** 4)]
        [1.0001, 1.026, 2.0, 14.3183]
    """
    a = _positive("a", a)
    b = _positive("b", b)

    def interval(k: int) -> float:
        return 1.0 + (a * math.log10(max(k, 1))) ** b

    return interval


# ----------------------------------------------------------------------------------------------
# Epoch schedules (torch / AdaTune baselines, ALGORITHMS.md §8.6)


def step_decay(init_value: float, step_size: int, gamma: float,
               steps_per_epoch: int = 1) -> Schedule:
    r"""Staircase decay, torch's ``StepLR``: multiply by ``gamma`` every ``step_size`` epochs.

    .. math::
        \eta(e) = \eta_0 \, \gamma^{\lfloor e / s \rfloor},
        \qquad e = \text{count} / \text{steps\_per\_epoch}

    with :math:`s` = ``step_size`` (> 0, epochs) and :math:`\gamma` = ``gamma`` (> 0). The stair
    index is an integer division of the step count. There is no default ``gamma``: torch uses
    0.1, AdaTune ``s = 30`` and :math:`\gamma = 1`, which is a constant schedule.

    Example:
        >>> f = step_decay(1.0, step_size=2, gamma=0.5)
        >>> [f(k) for k in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    init = _real("init_value", init_value)
    size = _integer("step_size", step_size, 1)
    gamma = _positive("gamma", gamma)
    per_epoch = _integer("steps_per_epoch", steps_per_epoch, 1)
    stair = size * per_epoch

    return lambda count: _times_power(init, gamma, count // stair)


def exponential_lr(init_value: float, gamma: float, steps_per_epoch: int = 1) -> Schedule:
    r"""Exponential decay per epoch, torch's ``ExponentialLR`` (fractional epochs allowed).

    .. math::
        \eta(e) = \eta_0 \, \gamma^{e}, \qquad e = \text{count} / \text{steps\_per\_epoch}

    ``gamma`` > 0 is required; :math:`\gamma = 1` (AdaTune's default ``lr_decay``) is a
    constant schedule.

    Example:
        >>> f = exponential_lr(1.0, gamma=0.25, steps_per_epoch=2)
        >>> [f(k) for k in range(5)]
        [1.0, 0.5, 0.25, 0.125, 0.0625]
    """
    init = _real("init_value", init_value)
    gamma = _positive("gamma", gamma)
    per_epoch = _integer("steps_per_epoch", steps_per_epoch, 1)

    return lambda count: _times_power(init, gamma, count / per_epoch)


def sgdr_schedule(init_value: float, t_0: int = 10, t_mult: int = 2,
                  eta_min: float | None = None, steps_per_epoch: int = 1) -> Schedule:
    r"""Cosine annealing with warm restarts (SGDR; Loshchilov & Hutter, 2017).

    Cycle :math:`n` lasts :math:`T_i = T_0 T_{\text{mult}}^n` epochs and starts at epoch
    :math:`S_n = T_0 (T_{\text{mult}}^n - 1) / (T_{\text{mult}} - 1)` (:math:`n T_0` when
    :math:`T_{\text{mult}} = 1`). With :math:`e = \text{count} / \text{steps\_per\_epoch}` and
    :math:`n` the largest integer with :math:`S_n \le e`:

    .. math::
        \eta(e) = \eta_{\min} + (\eta_0 - \eta_{\min})
                  \,\tfrac12\bigl(1 + \cos(\pi (e - S_n) / T_i)\bigr)

    Defaults are AdaTune's: ``t_0 = 10``, ``t_mult = 2`` (both integers, ``t_0 > 0``,
    ``t_mult >= 1``) and ``eta_min = 1e-4 * init_value`` when ``None``; restarts then fall on
    epochs 10, 30, 70, 150, 310, ... Values equal torch's ``CosineAnnealingWarmRestarts`` stepped
    with ``step(e)``, except that :math:`n` is found with integer arithmetic on the step count:
    torch's floating-point logarithm misses some restarts (``t_0 = 10, t_mult = 3`` at
    ``e = 1210`` gives :math:`\eta_{\min}` instead of :math:`\eta_0`).

    Example:
        >>> f = sgdr_schedule(1.0, t_0=2, t_mult=2, eta_min=0.0)
        >>> [round(f(k), 6) for k in range(7)]
        [1.0, 0.5, 1.0, 0.853553, 0.5, 0.146447, 1.0]
    """
    init = _real("init_value", init_value)
    t_0 = _integer("t_0", t_0, 1)
    t_mult = _integer("t_mult", t_mult, 1)
    low = 1e-4 * init if eta_min is None else _real("eta_min", eta_min)
    per_epoch = _integer("steps_per_epoch", steps_per_epoch, 1)
    first = t_0 * per_epoch                                 # first cycle, in steps

    def cycle(count: int) -> tuple[int, int]:
        """(start, length) of the cycle holding ``count``, both in steps, exactly."""
        if t_mult == 1:
            return count - count % first, first
        # S_n <= e  <=>  t_mult**n - 1 <= count (t_mult - 1) / first  <=>  t_mult**n <= 1 + q
        q = count * (t_mult - 1) // first
        power = 1
        while power * t_mult <= 1 + q:
            power *= t_mult
        return first * (power - 1) // (t_mult - 1), first * power

    def schedule(count: int) -> float:
        start, length = cycle(count)
        return low + (init - low) * 0.5 * (1.0 + math.cos(math.pi * (count - start) / length))

    return schedule
