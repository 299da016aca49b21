"""First-moment transforms: heavy-ball momentum (``trace``), exponential moving averages (``ema``)
and quasi-hyperbolic momentum (``qh_momentum``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    Hyper,
    Tree,
    as_tree,
    check_choice,
    check_constant,
    check_decay,
    check_dense_real,
    check_number,
    hoist,
    leaves,
    lend,
    resolve,
    writable,
    zeros_like_state,
)
from gradchain.distributed import local_shards

__all__ = ["trace", "ema", "qh_momentum"]


class TraceState(NamedTuple):
    count: int
    momentum: list[Tensor]


class EmaState(NamedTuple):
    count: int
    ema: list[Tensor]


class QHMomentumState(NamedTuple):
    count: int
    momentum: list[Tensor]


def trace(decay: Hyper = 0.9, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum in PyTorch SGD's convention (no dampening).

    .. math::
        b_t = \\mu\\, b_{t-1} + u_t, \\qquad
        o_t = b_t \\;\\text{or, with Nesterov,}\\; o_t = u_t + \\mu\\, b_t

    ``decay`` (μ) defaults to 0.9 and may be a schedule; ``b_0 = 0``, so the first output is the
    input itself, as in ``torch.optim.SGD``. State: one buffer per parameter. Without Nesterov,
    on CPU, given a ``borrowed`` extra (a set, from a caller that only reads the final updates,
    as the optimizer adapter does), the output is the buffer itself, lent without a copy: its
    ids go into the set, and a later member that writes copies first (``writable``). (The
    in-place form goes one tensor at a time: cheap on the adapter's CPU pieces, one kernel
    launch per parameter elsewhere, where the two foreach kernels are kept.)

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
            if nesterov:
                out = writable(u, extras)
                torch._foreach_mul_(b, mu)
                torch._foreach_add_(b, out)              # b <- mu b + u
                torch._foreach_add_(out, b, alpha=mu)    # o <- u + mu b
            elif u[0].device.type == "cpu" and lend(b, extras):  # b <- u + mu b; o <- b
                for u_i, b_i in zip(u, b):
                    torch.add(u_i, b_i, alpha=mu, out=b_i)
                out = b
            else:
                # o <- u + mu b_{t-1} = b_t, out of place: one pass, where cloning a raw
                # gradient first (writable) would take two
                out = torch._foreach_add(u, b, alpha=mu)
                torch._foreach_copy_(local_shards(b), local_shards(out, b))
            updates = as_tree(updates, out)
        return updates, TraceState(state.count + 1, b)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)


def ema(decay: Hyper = 0.9, debias: bool = True) -> GradientTransformation:
    """Exponential moving average of the updates, optionally bias-corrected.

    .. math::
        m_t = \\beta\\, m_{t-1} + (1-\\beta)\\, u_t, \\qquad
        o_t = m_t / (1-\\beta^t) \\;\\text{(debias)}\\;\\text{or}\\; m_t

    ``decay`` (β) defaults to 0.9; it may be a schedule when ``debias=False`` (the correction
    :math:`1-\\beta^t` assumes a constant β). State: one buffer per parameter.

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


_QH_CORRECTIONS = ("esgd", "qhadam", "none")


def qh_momentum(beta: float = 0.9, nu: float | None = None,
                bias_correction: str = "esgd") -> GradientTransformation:
    r"""Quasi-hyperbolic momentum (Ma & Yarats, 2019), with ESGD-M's bias correction.

    An exponential moving average of the updates, mixed back with the current update:

    .. math::
        m_t = \beta\, m_{t-1} + (1-\beta)\, u_t, \qquad
        q_t = \nu\, m_t + (1-\nu)\, u_t

    and the output, by ``bias_correction`` (t counts every call, from 1):

    - ``"esgd"`` (default, ESGD-M): :math:`o_t = q_t / (1-\nu\beta^t)`. A constant input comes
      out unchanged at every step, and the first output is :math:`u_1` for any ν.
    - ``"qhadam"`` (QHAdam's numerator): :math:`o_t = \nu\, m_t/(1-\beta^t) + (1-\nu)\, u_t`.
    - ``"none"`` (the QHM paper): :math:`o_t = q_t`.

    Special cases: ν = 0 is no momentum (:math:`o = u`); ν = 1 is EMA momentum
    (:math:`m_t`, bias-corrected under ``"esgd"`` and ``"qhadam"``); ν = β is Nesterov's
    look-ahead. With ``"none"``, ν = 1 gives :math:`(1-\beta)` times ``torch.optim.SGD``'s
    momentum buffer and ν = β :math:`(1-\beta)` times its Nesterov direction (both with
    dampening 0). ``nu=None`` means ν = β (Nesterov), ESGD-M's default; the QHM paper
    recommends β = 0.999, ν = 0.7.

    Defaults: β = 0.9, ν = β, ``"esgd"``. ``beta`` in [0, 1) and ``nu`` in [0, 1] are numbers
    (the corrections assume a constant β). State: ``momentum`` (:math:`m`), one buffer per
    parameter (float32 for 16-bit parameters), and ``count``.

    Example:
        >>> tx = qh_momentum(beta=0.5, nu=0.5)
        >>> s = tx.init([torch.zeros(1)])
        >>> u, s = tx.update([torch.ones(1)], s); u  # t = 1: the input itself
        [tensor([1.])]
        >>> u, s = tx.update([torch.full((1,), 3.0)], s); u  # (0.5 * 1.75 + 0.5 * 3) / 0.875
        [tensor([2.7143])]
    """
    check_constant("qh_momentum", beta=beta, nu=nu)
    check_decay("beta", beta)
    if nu is None:
        nu = beta
    check_number("nu", nu)
    if not 0.0 <= float(nu) <= 1.0:
        raise ValueError(f"nu must be in [0, 1], got {nu}")
    check_choice("bias_correction", bias_correction, _QH_CORRECTIONS)
    beta, nu = float(beta), float(nu)

    def init(params: Tree) -> QHMomentumState:
        return QHMomentumState(count=0, momentum=zeros_like_state(leaves(params)))

    def update(updates: Tree, state: QHMomentumState, params: Tree | None = None,
               **extras: Any):
        u = leaves(updates)
        t = state.count + 1
        if not u:
            return updates, state._replace(count=t)
        check_dense_real(u, "qh_momentum")
        m = state.momentum
        torch._foreach_lerp_(m, u, 1.0 - beta)               # m <- beta m + (1 - beta) u
        if nu == 0.0:                                        # no momentum: o = u
            out = list(u)
        elif bias_correction == "qhadam":
            out = torch._foreach_mul(m, hoist(nu / (1.0 - beta ** t)))
            torch._foreach_add_(out, u, alpha=1.0 - nu)      # nu m-hat + (1 - nu) u
        else:
            out = writable(u, extras)
            torch._foreach_lerp_(out, m, nu)                 # q = nu m + (1 - nu) u
            correction = 1.0 - nu * beta ** t if bias_correction == "esgd" else 1.0
            if correction != 1.0:
                torch._foreach_mul_(out, hoist(1.0 / correction))
        return as_tree(updates, out), QHMomentumState(t, m)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)
