"""PaLM's second-moment decay schedule, as a hyperparameter and as a chain member."""

from __future__ import annotations

from typing import Any

from gradchain.core import EmptyState, GradientTransformation, Tree, check_positive

__all__ = ["palm_beta2", "PalmBeta2"]


class PalmBeta2:
    """The schedule :math:`\\beta_2(k) = 1 - k^{-\\gamma}` of ``palm_beta2``.

    Called with a transform's 0-based count of its own real updates, it returns
    :math:`\\beta_2(\\text{count} + 1)`. ``product(count)`` is
    :math:`\\prod_{j \\le k} \\beta_2(j)`, which is 0 (the first decay is 0, so an EMA with this
    decay needs no bias correction), or :math:`\\beta_2(k)^k` with ``heavyball_debias``, which
    makes in-place debiased moments use HeavyBall's
    :math:`\\hat\\beta(k) = 1 - (1 - \\beta_2(k))/(1 - \\beta_2(k)^k)`. Make it with
    ``palm_beta2`` (defaults: scale 0.8, heavyball_debias False).

    Example:
        >>> b2 = palm_beta2(1.0)  # gamma = 1: the arithmetic mean
        >>> b2(0), b2(1), b2(3), b2.product(3)
        (0.0, 0.5, 0.75, 0.0)
        >>> b2.as_transform().provides["second_moment_decay"] is b2
        True
    """

    def __init__(self, scale: float, heavyball_debias: bool) -> None:
        self.scale = scale
        self.heavyball_debias = heavyball_debias

    def __call__(self, count: int) -> float:
        return 1.0 - float(count + 1) ** -self.scale

    def product(self, count: int) -> float:
        return self(count) ** (count + 1) if self.heavyball_debias else 0.0

    def as_transform(self) -> GradientTransformation:
        """The chain member: passes updates through and sets the second-moment decay of the
        members after it."""

        def init(params: Tree) -> EmptyState:
            return EmptyState()

        def update(updates: Tree, state: EmptyState, params: Tree | None = None, **extras: Any):
            return updates, state

        return GradientTransformation(init, update, leafwise=True, elementwise=True,
                                      accepts_sparse=True,
                                      provides={"second_moment_decay": self})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PalmBeta2) and \
            (self.scale, self.heavyball_debias) == (other.scale, other.heavyball_debias)

    def __hash__(self) -> int:
        return hash((PalmBeta2, self.scale, self.heavyball_debias))

    def __repr__(self) -> str:
        flag = ", heavyball_debias=True" if self.heavyball_debias else ""
        return f"palm_beta2({self.scale}{flag})"


def palm_beta2(scale: float = 0.8, heavyball_debias: bool = False) -> PalmBeta2:
    """PaLM's second-moment decay (Chowdhery et al., 2022; Adafactor's ``decay_rate``).

    .. math::  \\beta_2(k) = 1 - k^{-\\gamma}, \\qquad k = 1, 2, \\dots

    where k is the 1-based index of the consuming transform's real update (SOAP's
    initialisation call does not count) and :math:`\\gamma` = ``scale`` (default 0.8).
    :math:`\\beta_2(1) = 0`, so the moving average's weights always sum to one and no bias
    correction is applied; the averaging window grows like :math:`k^\\gamma` (fast early
    adaptation, smooth late estimates). ``scale = 1`` makes the average the arithmetic mean.
    ``heavyball_debias=True`` reproduces HeavyBall, which debiases in-place moments as if
    :math:`\\beta_2(k)` were constant (it forgets faster early on).

    Use it as the ``b2`` of a second-moment transform, or as a chain member: it then sets the
    second-moment decay of the transforms after it in the same chain (``scale_by_adam``,
    ``scale_by_rms``, the in-place pieces, LaProp, ADOPT and ``soap_precondition``). It keeps
    no state and is never written into param groups or checkpoints.

    Example:
        >>> from gradchain import chain
        >>> from gradchain.transforms import scale_by_adam, scale_by_learning_rate
        >>> round(palm_beta2()(9), 7)  # beta2 at the 10th update
        0.8415107
        >>> tx = chain(palm_beta2(0.8), scale_by_adam(), scale_by_learning_rate(1e-3))
    """
    check_positive("scale", scale)
    return PalmBeta2(float(scale), bool(heavyball_debias))
