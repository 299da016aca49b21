"""Second-moment (diagonal) preconditioners: Adam and RMSprop."""

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
    check_non_negative,
    decay_product,
    hoist,
    leaves,
    resolve,
    second_moment_decay,
    zeros_like_state,
)

__all__ = ["scale_by_adam", "scale_by_rms"]


class AdamState(NamedTuple):
    count: int
    mu: list[Tensor]
    nu: list[Tensor]


class RmsState(NamedTuple):
    count: int
    nu: list[Tensor]


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: Hyper = 1e-8,
                  eps_root: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Adam's preconditioner (Kingma & Ba, 2015), optax's convention.

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) u_t, \\quad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) u_t^2, \\\\
        \\hat m_t = \\frac{m_t}{1-\\beta_1^t}, \\quad
        \\hat v_t = \\frac{v_t}{1-\\beta_2^t}, \\quad
        o_t = \\frac{\\hat m_t}{\\sqrt{\\hat v_t + \\epsilon_{root}} + \\epsilon}

    With ``nesterov``, :math:`\\hat m_t` becomes
    :math:`\\beta_1 m_t/(1-\\beta_1^{t+1}) + (1-\\beta_1) u_t/(1-\\beta_1^t)` (NAdam).
    Defaults b1 = 0.9, b2 = 0.999, eps = 1e-8, eps_root = 0. eps is added to
    :math:`\\sqrt{\\hat v}`, as in ``torch.optim.Adam``. State: m and v, one buffer each per
    parameter (float32 for 16-bit parameters). ``b2`` may be a schedule of the step count;
    the bias correction is then :math:`1 - \\prod_j \\beta_{2,j}` (``core.decay_product``:
    none for ``palm_beta2``), and a ``palm_beta2`` earlier in the chain replaces ``b2``.
    ``eps`` may be a schedule too (HD-Adam's eps on the uncorrected :math:`\\sqrt{v}`).

    Example:
        >>> tx = scale_by_adam()
        >>> out, state = tx.update([torch.tensor([2.0, -3.0])], tx.init([torch.zeros(2)]))
        >>> out[0]  # the first step is u / (|u| + eps)
        tensor([ 1.0000, -1.0000])
    """
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_non_negative("eps", eps)
    check_non_negative("eps_root", eps_root)

    def init(params: Tree) -> AdamState:
        p = leaves(params)
        return AdamState(count=0, mu=zeros_like_state(p), nu=zeros_like_state(p))

    def update(updates: Tree, state: AdamState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        t = state.count + 1
        if not u:
            return updates, state._replace(count=t)
        check_dense_real(u, "scale_by_adam")
        decay2 = second_moment_decay(b2, extras)
        beta1, beta2 = resolve(b1, state.count), resolve(decay2, state.count)
        mu, nu = state.mu, state.nu
        torch._foreach_lerp_(mu, u, 1.0 - beta1)
        torch._foreach_mul_(nu, beta2)
        torch._foreach_addcmul_(nu, u, u, 1.0 - beta2)
        correction1 = 1.0 - decay_product(b1, state.count)
        correction2 = 1.0 - decay_product(decay2, state.count)
        if eps_root == 0.0:
            # sqrt(v / c2) + eps, with the 1 / c1 of m-hat folded into the same two passes
            denom = torch._foreach_sqrt(nu)
            torch._foreach_mul_(denom, hoist(correction1 / correction2 ** 0.5))
            # a list of the scalar: dynamo reads a single tensor scalar of foreach_add with .item()
            torch._foreach_add_(denom, [hoist(resolve(eps, state.count) * correction1)]
                                * len(denom))
        else:
            denom = torch._foreach_mul(nu, hoist(1.0 / correction2))
            torch._foreach_add_(denom, eps_root)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, resolve(eps, state.count))
            torch._foreach_mul_(denom, hoist(correction1))
        if nesterov:
            # beta1 m / (1 - beta1^(t+1)) + (1 - beta1) u / (1 - beta1^t), over denom / c1
            numer = torch._foreach_mul(mu, hoist(beta1 * correction1 / (1.0 - beta1 ** (t + 1))))
            torch._foreach_add_(numer, u, alpha=1.0 - beta1)
            torch._foreach_div_(numer, denom)
            out = numer
        else:
            out = torch._foreach_div(mu, denom)
        return as_tree(updates, out), AdamState(t, mu, nu)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)


def scale_by_rms(decay: Hyper = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
                 eps_in_sqrt: bool = True, bias_correction: bool = False
                 ) -> GradientTransformation:
    """RMSprop's preconditioner (Tieleman & Hinton, 2012), optax's convention.

    .. math::
        v_t = \\beta v_{t-1} + (1-\\beta) u_t^2, \\qquad
        o_t = \\frac{u_t}{\\sqrt{\\hat v_t + \\epsilon}} \\;\\text{or}\\;
              \\frac{u_t}{\\sqrt{\\hat v_t} + \\epsilon}\\;(\\texttt{eps\\_in\\_sqrt=False})

    :math:`\\hat v_t = v_t/(1-\\beta^t)` with ``bias_correction``, else :math:`v_t`. Defaults:
    decay 0.9, eps 1e-8, v_0 = initial_scale = 0. ``torch.optim.RMSprop`` is decay = alpha =
    0.99, ``eps_in_sqrt=False``. State: v, one buffer per parameter.

    Example:
        >>> tx = scale_by_rms(decay=0.0, eps=0.0)
        >>> tx.update([torch.tensor([2.0, -3.0])], tx.init([torch.zeros(2)]))[0]
        [tensor([ 1., -1.])]
    """
    check_decay("decay", decay)
    check_non_negative("eps", eps)
    check_non_negative("initial_scale", initial_scale)

    def init(params: Tree) -> RmsState:
        nu = zeros_like_state(leaves(params))
        if initial_scale and nu:
            torch._foreach_add_(nu, initial_scale)
        return RmsState(count=0, nu=nu)

    def update(updates: Tree, state: RmsState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        t = state.count + 1
        if not u:
            return updates, state._replace(count=t)
        check_dense_real(u, "scale_by_rms")
        decay2 = second_moment_decay(decay, extras)
        beta = resolve(decay2, state.count)
        nu = state.nu
        torch._foreach_mul_(nu, beta)
        torch._foreach_addcmul_(nu, u, u, 1.0 - beta)
        correction = 1.0 - decay_product(decay2, state.count) if bias_correction else 1.0
        if eps_in_sqrt:
            denom = torch._foreach_div(nu, hoist(correction))
            torch._foreach_add_(denom, eps)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(nu)
            torch._foreach_div_(denom, hoist(correction ** 0.5))
            torch._foreach_add_(denom, eps)
        return as_tree(updates, torch._foreach_div(u, denom)), RmsState(t, nu)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)
