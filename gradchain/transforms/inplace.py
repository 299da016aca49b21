r"""HeavyBall's in-place pieces: Adam, RMS, LaProp and ADOPT with debiased moments in place.

The moments are stored bias-corrected (ALGORITHMS.md §9.2): an EMA with decay :math:`\beta` is
updated with

.. math::  \hat\beta_k = 1 - \frac{1 - \beta_k}{1 - P_k}, \qquad
           \hat m_k = \hat\beta_k \hat m_{k-1} + (1 - \hat\beta_k) u_k

(``core.debiased_decay``; :math:`P_k = \prod_{j \le k} \beta_j`, 0 for ``palm_beta2``), which
is exactly Adam's :math:`m_k / (1 - \beta^k)`, stored: one ``lerp`` per moment and no
correction pass. :math:`\hat\beta_1 = 0`, so the first sample fills the buffer. Denominators
use eps as a floor, :math:`\max(\sqrt{\hat v}, \epsilon)`.

Every ``b2`` may be a schedule and is replaced by a ``palm_beta2`` that comes earlier in the
same chain (``core.second_moment_decay``). Schedules see the 0-based index of the moment's own
update (the count of this transform's calls, except where ``scale_by_adopt`` says otherwise).
State is float32 for 16-bit parameters. Outputs never share memory with the state, except that
LaProp and ADOPT lend their momentum as the output to a caller that allows it (``core.lend``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    Hyper,
    Tree,
    as_tree,
    check_choice,
    check_decay,
    check_dense_real,
    check_non_negative,
    debiased_decay,
    divide_into_,
    hoist,
    leaves,
    lend,
    lerp_,
    resolve,
    second_moment_decay,
    writable,
    zeros_like_state,
)
from gradchain.distributed import local_shards

__all__ = ["scale_by_adam_inplace", "scale_by_rms_inplace", "scale_by_laprop", "scale_by_adopt"]

_ADOPT_STYLES = ("heavyball", "paper")


class InplaceAdamState(NamedTuple):
    count: int
    mu: list[Tensor]  # bias-corrected first moment
    nu: list[Tensor]  # bias-corrected second moment


class InplaceRmsState(NamedTuple):
    count: int
    nu: list[Tensor]  # bias-corrected second moment


class LapropState(NamedTuple):
    count: int
    mu: list[Tensor]  # bias-corrected moment of the normalised updates
    nu: list[Tensor]  # bias-corrected second moment


class AdoptState(NamedTuple):
    count: int
    mu: list[Tensor]  # moment of the normalised updates
    nu: list[Tensor]  # second moment of the updates before this call


def _second_moment_(nu: list[Tensor], u: list[Tensor], weight: float) -> None:
    """``v <- (1 - w) v + w u^2``. As a lerp towards u² (no tensor-weight ``addcmul`` exists for
    ``torch.compile``), which also keeps a constant u² exactly."""
    lerp_(nu, torch._foreach_mul(u, u), weight)


def _output(moment: list[Tensor], scratch: list[Tensor], extras: Mapping[str, Any]
            ) -> list[Tensor]:
    """The moment as the output: lent when the caller allows (``lend``), else copied into
    ``scratch``."""
    if lend(moment, extras):
        return moment
    torch._foreach_copy_(local_shards(scratch), local_shards(moment, scratch))
    return scratch


def _over_floored_root(numerator: list[Tensor], nu: list[Tensor], eps: float) -> list[Tensor]:
    """A new list :math:`a / \\max(\\sqrt{v}, \\epsilon)`. In eager mode the quotients are
    written into the denominators' buffers: one new tensor per entry rather than two (each new
    one is faulted into memory); the same numbers."""
    denom = torch._foreach_sqrt(nu)
    torch._foreach_maximum_(local_shards(denom), eps)  # DTensors have no sharding rule for it
    if torch.compiler.is_compiling():
        return torch._foreach_div(numerator, denom)
    divide_into_(local_shards(numerator, denom), local_shards(denom))
    return denom


def _check_moments(b1: Hyper, b2: Hyper, eps: float) -> None:
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_non_negative("eps", eps)


def _moment_buffers(params: Tree) -> tuple[list[Tensor], list[Tensor]]:
    p = leaves(params)
    return zeros_like_state(p), zeros_like_state(p)


def scale_by_adam_inplace(b1: Hyper = 0.9, b2: Hyper = 0.99, eps: float = 1e-8
                          ) -> GradientTransformation:
    r"""Adam with in-place debiased moments (HeavyBall's ``ForeachAdamW`` preconditioner).

    .. math::
        \hat m_t = \hat\beta_{1,t} \hat m_{t-1} + (1-\hat\beta_{1,t}) u_t, \quad
        \hat v_t = \hat\beta_{2,t} \hat v_{t-1} + (1-\hat\beta_{2,t}) u_t^2, \quad
        o_t = \frac{\hat m_t}{\max(\sqrt{\hat v_t}, \epsilon)}

    with :math:`\hat\beta_t = 1 - (1-\beta)/(1-\beta^t)`, so that :math:`\hat m_t, \hat v_t`
    are Adam's bias-corrected moments (``scale_by_adam`` up to eps placement: here eps floors
    :math:`\sqrt{\hat v}` instead of being added). The first output is :math:`\mathrm{sign}(u)`
    where :math:`|u| > \epsilon`. Defaults b1 = 0.9, b2 = 0.99, eps = 1e-8 (HeavyBall's).
    ``b1`` and ``b2`` may be schedules of the step count; a ``palm_beta2`` earlier in the chain
    replaces ``b2``. State: ``mu`` and ``nu``, the stored bias-corrected moments.

    Example:
        >>> tx = scale_by_adam_inplace()
        >>> out, state = tx.update([torch.tensor([2.0, -3.0])], tx.init([torch.zeros(2)]))
        >>> out[0], state.nu[0]  # the first step is sign(u); nu holds u^2
        (tensor([ 1., -1.]), tensor([4., 9.]))
    """
    _check_moments(b1, b2, eps)

    def init(params: Tree) -> InplaceAdamState:
        return InplaceAdamState(0, *_moment_buffers(params))

    def update(updates: Tree, state: InplaceAdamState, params: Tree | None = None,
               **extras: Any):
        u = leaves(updates)
        if not u:
            return updates, state._replace(count=state.count + 1)
        check_dense_real(u, "scale_by_adam_inplace")
        decay2 = second_moment_decay(b2, extras)
        mu, nu = state.mu, state.nu
        lerp_(mu, u, 1.0 - debiased_decay(b1, state.count))
        _second_moment_(nu, u, 1.0 - debiased_decay(decay2, state.count))
        out = _over_floored_root(mu, nu, eps)
        return as_tree(updates, out), InplaceAdamState(state.count + 1, mu, nu)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)


def scale_by_rms_inplace(b2: Hyper = 0.99, eps: float = 1e-8) -> GradientTransformation:
    r"""RMS normalisation by an in-place debiased second moment (HeavyBall's schedule-free
    AdamW base).

    .. math::
        \hat v_t = \hat\beta_{2,t} \hat v_{t-1} + (1-\hat\beta_{2,t}) u_t^2, \qquad
        o_t = \frac{u_t}{\max(\sqrt{\hat v_t}, \epsilon)}

    with :math:`\hat\beta_t = 1 - (1-\beta)/(1-\beta^t)`: :math:`\hat v_t` is the
    bias-corrected EMA of :math:`u^2`. Defaults b2 = 0.99, eps = 1e-8. ``b2`` may be a
    schedule; a ``palm_beta2`` earlier in the chain replaces it (with ``palm_beta2(1.0)``,
    :math:`\hat v_t` is the arithmetic mean of :math:`u_1^2, \dots, u_t^2`). State: ``nu``.

    Example:
        >>> tx = scale_by_rms_inplace(b2=0.5, eps=0.0)
        >>> state = tx.init([torch.zeros(1)])
        >>> _, state = tx.update([torch.tensor([2.0])], state)
        >>> out, state = tx.update([torch.tensor([1.0])], state)
        >>> state.nu[0]  # (2^2 + 2 * 1^2) / 3: beta-hat_2 = 0.5 / (1 + 0.5)
        tensor([2.])
    """
    check_decay("b2", b2)
    check_non_negative("eps", eps)

    def init(params: Tree) -> InplaceRmsState:
        return InplaceRmsState(0, zeros_like_state(leaves(params)))

    def update(updates: Tree, state: InplaceRmsState, params: Tree | None = None,
               **extras: Any):
        u = leaves(updates)
        if not u:
            return updates, state._replace(count=state.count + 1)
        check_dense_real(u, "scale_by_rms_inplace")
        nu = state.nu
        decay2 = second_moment_decay(b2, extras)
        _second_moment_(nu, u, 1.0 - debiased_decay(decay2, state.count))
        out = _over_floored_root(u, nu, eps)  # a new list: no clone of u first
        return as_tree(updates, out), InplaceRmsState(state.count + 1, nu)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)


def scale_by_laprop(b1: Hyper = 0.9, b2: Hyper = 0.99, eps: float = 1e-8
                    ) -> GradientTransformation:
    r"""LaProp (Ziyin et al., 2020): momentum of the RMS-normalised updates, moments debiased
    in place.

    .. math::
        \hat v_t = \hat\beta_{2,t} \hat v_{t-1} + (1-\hat\beta_{2,t}) u_t^2, \quad
        n_t = \frac{u_t}{\max(\sqrt{\hat v_t}, \epsilon)}, \quad
        \hat m_t = \hat\beta_{1,t} \hat m_{t-1} + (1-\hat\beta_{1,t}) n_t, \quad
        o_t = \hat m_t

    with :math:`\hat\beta_t = 1 - (1-\beta)/(1-\beta^t)`. This is the paper's bias-corrected
    form :math:`m_t/(1-\beta_1^t)` with :math:`n_t = u_t/(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)`,
    up to eps placement. Unlike Adam, the momentum averages already-normalised steps, so
    :math:`\beta_1` and :math:`\beta_2` decouple. The first output is :math:`\mathrm{sign}(u)`
    where :math:`|u| > \epsilon`. Defaults b1 = 0.9, b2 = 0.99, eps = 1e-8. ``b1``/``b2`` may
    be schedules; a ``palm_beta2`` earlier in the chain replaces ``b2``. State: ``mu``, ``nu``.

    Example:
        >>> tx = scale_by_laprop()
        >>> out, _ = tx.update([torch.tensor([0.5, -4.0])], tx.init([torch.zeros(2)]))
        >>> out[0]
        tensor([ 1., -1.])
    """
    _check_moments(b1, b2, eps)

    def init(params: Tree) -> LapropState:
        return LapropState(0, *_moment_buffers(params))

    def update(updates: Tree, state: LapropState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        if not u:
            return updates, state._replace(count=state.count + 1)
        check_dense_real(u, "scale_by_laprop")
        mu, nu = state.mu, state.nu
        decay2 = second_moment_decay(b2, extras)
        _second_moment_(nu, u, 1.0 - debiased_decay(decay2, state.count))
        out = _over_floored_root(u, nu, eps)   # n, a new list
        lerp_(mu, out, 1.0 - debiased_decay(b1, state.count))
        out = _output(mu, out, extras)
        return as_tree(updates, out), LapropState(state.count + 1, mu, nu)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)


def scale_by_adopt(b1: Hyper = 0.9, b2: Hyper = 0.99, eps: float = 1e-8,
                   clip: bool | None = None, style: str = "heavyball"
                   ) -> GradientTransformation:
    r"""ADOPT (Taniguchi et al., 2024): normalise by the second moment of the *previous*
    updates, then average.

    At t = 1 the second moment is initialised, :math:`v_1 = u_1^2`, and the output is exactly
    zero. For t ≥ 2:

    .. math::
        n_t = \mathrm{clip}_{c_t}\!\left(\frac{u_t}{\max(\sqrt{v_{t-1}}, \epsilon)}\right),
        \quad c_t = (t-1)^{1/4}, \qquad
        m_t = \beta'_1 m_{t-1} + (1-\beta'_1) n_t, \quad o_t = m_t, \qquad
        v_t = \beta'_2 v_{t-1} + (1-\beta'_2) u_t^2

    (clipping to :math:`[-c_t, c_t]` only with ``clip``). ``style="heavyball"`` (default;
    HeavyBall's ``ForeachADOPT`` without its one-step lag): debiased decays, the k-th momentum
    update (k = t - 1) uses :math:`\beta'_1 = \hat\beta_1(k)` and the k-th second-moment update
    (k = t, the initialisation being the first) :math:`\beta'_2 = \hat\beta_2(k)`, with
    :math:`\hat\beta(k) = 1 - (1-\beta)/(1-\beta^k)`; :math:`\hat\beta_1(1) = 0`, so the
    first non-zero output is :math:`n_2` itself. ``style="paper"`` (the paper and
    ``optax.contrib.scale_by_adopt``): plain :math:`\beta'_1 = \beta_1`,
    :math:`\beta'_2 = \beta_2` after :math:`v_1 = u_1^2` (the paper's "initial :math:`g_1^2`,
    slow decay"); optax's defaults are b1 = 0.9, b2 = 0.9999, eps = 1e-6, which this style
    does not switch to by itself. ``clip=None`` means off for ``"heavyball"``, on for
    ``"paper"``.

    Defaults b1 = 0.9, b2 = 0.99, eps = 1e-8 (HeavyBall's). Schedules are evaluated at the
    0-based index of the moment's own update: ``count - 1`` for ``b1`` (no momentum update at
    t = 1), ``count`` for ``b2``. A ``palm_beta2`` earlier in the chain replaces ``b2``
    (its :math:`\beta_2(1) = 0` is the initialisation). State: ``mu``, ``nu``.

    Example:
        >>> tx = scale_by_adopt()
        >>> state = tx.init([torch.zeros(2)])
        >>> out, state = tx.update([torch.tensor([2.0, -1.0])], state)
        >>> out[0]  # the first call only initialises v
        tensor([0., 0.])
        >>> out, state = tx.update([torch.tensor([1.0, 1.0])], state)
        >>> out[0]  # u_2 / |u_1|
        tensor([0.5000, 1.0000])
    """
    _check_moments(b1, b2, eps)
    check_choice("style", style, _ADOPT_STYLES)
    if clip is not None and not isinstance(clip, bool):
        raise ValueError(f"clip must be True, False or None (the style's default), got {clip!r}")
    paper = style == "paper"
    clipping = paper if clip is None else clip

    def init(params: Tree) -> AdoptState:
        return AdoptState(0, *_moment_buffers(params))

    def decays(count: int, decay2: Hyper) -> tuple[float, float]:
        """The momentum and second-moment decays of call t = count + 1 >= 2."""
        if paper:
            return resolve(b1, count - 1), resolve(decay2, count)
        return debiased_decay(b1, count - 1), debiased_decay(decay2, count)

    def update(updates: Tree, state: AdoptState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        count = state.count
        if not u:
            return updates, state._replace(count=count + 1)
        check_dense_real(u, "scale_by_adopt")
        mu, nu = state.mu, state.nu
        decay2 = second_moment_decay(b2, extras)
        if count == 0:
            _second_moment_(nu, u, 1.0)
            out = writable(u, extras)
            torch._foreach_zero_(out)
            return as_tree(updates, out), AdoptState(1, mu, nu)
        beta1, beta2 = decays(count, decay2)
        out = _over_floored_root(u, nu, eps)   # n, with the previous v
        if clipping:
            limit = count ** 0.25
            torch._foreach_clamp_min_(out, [hoist(-limit)] * len(out))
            torch._foreach_clamp_max_(out, [hoist(limit)] * len(out))
        lerp_(mu, out, 1.0 - beta1)
        out = _output(mu, out, extras)
        _second_moment_(nu, u, 1.0 - beta2)
        return as_tree(updates, out), AdoptState(count + 1, mu, nu)

    return GradientTransformation(init, update, leafwise=True, elementwise=True)
