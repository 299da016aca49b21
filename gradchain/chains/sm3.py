"""The SM3 recipe with the authors' learning-rate advice (ALGORITHMS.md §8.2)."""

from __future__ import annotations

from gradchain.chains.combinators import named_chain
from gradchain.core import GradientTransformation, Hyper, resolve
from gradchain.schedules import sm3_warmup_cooldown
from gradchain.transforms.basic import scale_by_learning_rate
from gradchain.transforms.sm3 import scale_by_sm3

__all__ = ["sm3"]


def sm3(learning_rate: Hyper = 0.1, momentum: float = 0.0, b2: float = 1.0, eps: float = 1e-30,
        warmup_steps: int | None = None, total_steps: int | None = None, power: float = 2.0,
        cooldown_fraction: float = 0.1) -> GradientTransformation:
    """SM3-II (Anil et al., 2019) with an optional warm-up and cool-down of the learning rate.

    .. math::  x \\leftarrow x - \\eta\\, f(t)\\, \\frac{g}{\\sqrt{\\nu_t + \\epsilon}}, \\qquad
               f(t) = \\max\\Bigl(0, \\min\\Bigl(1, (t/W)^{p}, \\frac{T - t}{c\\,T}\\Bigr)\\Bigr)

    :math:`\\nu_t` is ``scale_by_sm3``'s bound on Adagrad's accumulator (EMA with ``b2 < 1``),
    and ``momentum`` its EMA of the preconditioned gradient (no buffer when 0). Without
    ``warmup_steps`` and ``total_steps`` the learning rate is constant (f = 1); with either,
    f is ``sm3_warmup_cooldown`` (W = ``warmup_steps`` or 0, T = ``total_steps`` or no
    cool-down, in optimizer steps). Defaults are torch-SM3's: lr 0.1, momentum 0, sums of
    squares, eps 1e-30. Members: ``sm3`` (``mu``, ``momentum``), ``lr``.

    Example:
        >>> tx = sm3(0.1, warmup_steps=100, total_steps=2000)
    """
    if warmup_steps is None and total_steps is None:
        rate: Hyper = learning_rate
    elif callable(learning_rate):
        shape = sm3_warmup_cooldown(1.0, warmup_steps or 0, total_steps, power, cooldown_fraction)
        rate = lambda count: resolve(learning_rate, count) * shape(count)  # noqa: E731
    else:
        rate = sm3_warmup_cooldown(learning_rate, warmup_steps or 0, total_steps, power,
                                   cooldown_fraction)
    return named_chain(
        ("sm3", scale_by_sm3(b1=momentum, b2=b2, eps=eps)),
        ("lr", scale_by_learning_rate(rate)),
    )
