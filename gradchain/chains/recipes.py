"""Named recipes of the standard optimizers, each a short function returning a chain.

Member names are checkpoint keys (``"adam.mu"``), so they are part of each recipe's contract.
"""

from __future__ import annotations

from gradchain.chains.combinators import named_chain
from gradchain.core import GradientTransformation, Hyper, Selector
from gradchain.transforms import add_decayed_weights, scale_by_adam, scale_by_learning_rate, trace

__all__ = ["sgd", "adam", "adamw"]


def sgd(learning_rate: Hyper = 1e-3, momentum: Hyper = 0.0, nesterov: bool = False,
        weight_decay: Hyper = 0.0) -> GradientTransformation:
    """Stochastic gradient descent with heavy-ball or Nesterov momentum (``torch.optim.SGD``).

    .. math::  g \\leftarrow g + \\lambda x, \\quad b \\leftarrow \\mu b + g, \\quad
               x \\leftarrow x - \\eta\\,(b \\text{ or } g + \\mu b)

    Weight decay is L2 (added to the gradient before momentum), as in ``torch.optim.SGD``. No
    momentum buffer is kept when ``momentum == 0``. Defaults η 1e-3, μ 0, nesterov False, λ 0.
    Members: ``weight_decay``, ``momentum``, ``lr``.

    Example:
        >>> tx = sgd(0.1, momentum=0.9, nesterov=True)
    """
    if nesterov and not (callable(momentum) or momentum > 0):
        raise ValueError("nesterov=True needs momentum > 0")
    members = [("weight_decay", add_decayed_weights(weight_decay))]
    if callable(momentum) or momentum != 0:
        members.append(("momentum", trace(momentum, nesterov)))
    members.append(("lr", scale_by_learning_rate(learning_rate)))
    return named_chain(*members)


def adam(learning_rate: Hyper = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: Hyper = 0.0) -> GradientTransformation:
    """Adam (Kingma & Ba, 2015) with L2 weight decay, as ``torch.optim.Adam``.

    .. math::  g \\leftarrow g + \\lambda x, \\quad
               x \\leftarrow x - \\eta\\,\\frac{\\hat m}{\\sqrt{\\hat v} + \\epsilon}

    Defaults η 1e-3, b1 0.9, b2 0.999, eps 1e-8, λ 0. Members: ``weight_decay``, ``adam``
    (``mu``, ``nu``, ``count``), ``lr``.

    Example:
        >>> tx = adam(1e-3)
    """
    return named_chain(
        ("weight_decay", add_decayed_weights(weight_decay)),
        ("adam", scale_by_adam(b1, b2, eps)),
        ("lr", scale_by_learning_rate(learning_rate)),
    )


def adamw(learning_rate: Hyper = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: Hyper = 1e-2, mask: Selector | None = None) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, as
    ``torch.optim.AdamW``.

    .. math::  x \\leftarrow x - \\eta\\left(\\frac{\\hat m}{\\sqrt{\\hat v} + \\epsilon}
               + \\lambda x\\right)

    ``mask`` limits the decay to some parameters (e.g. ``lambda name, p: p.ndim >= 2``).
    Defaults η 1e-3, b1 0.9, b2 0.999, eps 1e-8, λ 0.01, mask None (every parameter decays).
    Members: ``adam`` (``mu``, ``nu``, ``count``), ``weight_decay``, ``lr``.

    Example:
        >>> tx = adamw(1e-3, weight_decay=0.1)
    """
    return named_chain(
        ("adam", scale_by_adam(b1, b2, eps)),
        ("weight_decay", add_decayed_weights(weight_decay, mask)),
        ("lr", scale_by_learning_rate(learning_rate)),
    )
