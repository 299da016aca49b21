"""First-moment transforms: heavy-ball momentum (``trace``) and exponential moving averages."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    Hyper,
    Tree,
    as_tree,
    check_decay,
    check_dense_real,
    hoist,
    leaves,
    resolve,
    writable,
    zeros_like_state,
)

__all__ = ["trace", "ema"]


class TraceState(NamedTuple):
    count: int
    momentum: list[Tensor]


class EmaState(NamedTuple):
    count: int
    ema: list[Tensor]


def trace(decay: Hyper = 0.9, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum in PyTorch SGD's convention (no dampening).

    .. math::
        b_t = \\mu\\, b_{t-1} + u_t, \\qquad
        o_t = b_t \\;\\text{or, with Nesterov,}\\; o_t = u_t + \\mu\\, b_t

    ``decay`` (μ) defaults to 0.9 and may be a schedule; ``b_0 = 0``, so the first output is the
    input itself, as in ``torch.optim.SGD``. State: one buffer per parameter.

    Example:
        >>> tx = trace(0.9)
        >>> s = tx.init([torch.zeros(1)])
        >>> u, s = tx.update([torch.ones(1)], s); u, s = tx.update([torch.ones(1)], s); u
        [tensor([1.9000])]
    """
    check_decay("decay", decay)

    def init(params: Tree) -> TraceState:
        return TraceState(count=0, momentum=zeros_like_state(leaves(params)))

    def update(updates: Tree, state: TraceState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        mu = resolve(decay, state.count)
        b = state.momentum
        if u:
            check_dense_real(u, "trace")
            out = writable(u, extras)
            if nesterov:
                torch._foreach_mul_(b, mu)
                torch._foreach_add_(b, out)              # b <- mu b + u
                torch._foreach_add_(out, b, alpha=mu)    # o <- u + mu b
            else:
                torch._foreach_add_(out, b, alpha=mu)    # o <- u + mu b_{t-1} = b_t
                torch._foreach_copy_(b, out)
            updates = as_tree(updates, out)
        return updates, TraceState(state.count + 1, b)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)


def ema(decay: Hyper = 0.9, debias: bool = True) -> GradientTransformation:
    """Exponential moving average of the updates, optionally bias-corrected.

    .. math::
        m_t = \\beta\\, m_{t-1} + (1-\\beta)\\, u_t, \\qquad
        o_t = m_t / (1-\\beta^t) \\;\\text{(debias)}\\;\\text{or}\\; m_t

    ``decay`` (β) defaults to 0.9; it may be a schedule when ``debias=False`` (the correction
    :math:`1-\beta^t` assumes a constant β). State: one buffer per parameter.

    Example:
        >>> tx = ema(0.5)
        >>> tx.update([torch.ones(1)], tx.init([torch.zeros(1)]))[0]
        [tensor([1.])]
    """
    check_decay("decay", decay)
    if debias and callable(decay):
        raise ValueError("ema(debias=True) needs a constant decay; pass debias=False "
                         "to use a schedule")

    def init(params: Tree) -> EmaState:
        return EmaState(count=0, ema=zeros_like_state(leaves(params)))

    def update(updates: Tree, state: EmaState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        count = state.count + 1
        beta = resolve(decay, state.count)
        m = state.ema
        if u:
            check_dense_real(u, "ema")
            torch._foreach_lerp_(m, u, 1.0 - beta)
            correction = 1.0 - beta ** count if debias else 1.0
            updates = as_tree(updates, torch._foreach_div(m, hoist(correction)))
        return updates, EmaState(count, m)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)
