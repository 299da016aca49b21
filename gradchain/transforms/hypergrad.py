r"""Online learning-rate adaptation by hypergradients: HD, RTHO and MARTHE (ALGORITHMS.md §7).

The learning rate :math:`\eta` is a hyperparameter updated online by gradient descent on an outer
objective E, with the hypergradient :math:`h_t = \partial E / \partial \eta`:

- **HD** (Baydin et al., 2018), ``mode="hd"``: E is the training loss of the next minibatch and
  only the last step is differentiated, :math:`h_t = -\langle g_t, u_{t-1}\rangle`. A terminal
  transform after any direction-producing chain (momentum, Adam, ...).
- **RTHO** (Franceschi et al., 2017) and **MARTHE** (Donini et al., 2020), ``mode="marthe"``:
  E is a validation loss and :math:`h_t = \langle \nabla E(x_t), Z^x_t\rangle` with the tangent
  :math:`Z_t = \partial s_t / \partial\eta` of the whole trajectory (s = parameters and
  optimizer buffers), carried forward with a discount :math:`\mu` (RTHO: :math:`\mu = 1`). The
  transform owns the dynamics (SGD, SGD with momentum or Adam), since the tangent needs their
  internal state, and reads the ``hvp`` and ``val_grads`` extras.

Scalars (:math:`\eta, \beta, \mu, c`) are float64 0-d CPU tensors in the state and dot products
are accumulated in float64; a hyper-step reads them on the host (one synchronisation per step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from gradchain.core import (
    _caller_stacklevel,
    EmptyState,
    GradientTransformation,
    Tree,
    as_tree,
    check_choice,
    check_constant,
    check_decay,
    check_dense_real,
    check_non_negative,
    check_number,
    check_positive,
    check_structure,
    find_state,
    hessian_vector_products,
    leaves,
    writable,
    zeros_like_state,
)
from gradchain.distributed import (
    CURVATURE_INSTEAD,
    check_whole,
    local_shard,
    local_shards,
    sum_over_shards,
)

__all__ = [
    "HDState",
    "MartheState",
    "SgdTangent",
    "MomentumTangent",
    "AdamTangent",
    "MomentumBuffer",
    "AdamMoments",
    "hypergrad_lr",
    "hypergrad_lr_value",
    "LR_FLOOR_FACTOR",
]

_NAME = "hypergrad_lr"
_MODES = ("hd", "marthe")
_DYNAMICS = ("sgd", "sgd_momentum", "adam")
_LR_IN_JACOBIAN = ("current", "initial")

#: Without ``min_lr``, one hyper-step never shrinks the learning rate by more than this factor
#: (and never makes it zero or negative): the floor is ``LR_FLOOR_FACTOR * lr`` before the step.
LR_FLOOR_FACTOR = 1e-3


# ----------------------------------------------------------------------------------------------
# States


class HDState(NamedTuple):
    """State of ``hypergrad_lr(mode="hd")``: η and β as float64 0-d tensors, and the previous
    direction :math:`u_{t-1}` (zeros at first, so :math:`\\eta_1 = \\eta_0`).

    Example:
        >>> state = hypergrad_lr("hd", init_lr=0.1, hyper_lr=0.01).init([torch.zeros(2, 3)])
        >>> state.count, float(state.lr), state.prev_update[0].shape
        (0, 0.1, torch.Size([2, 3]))
    """

    count: int
    lr: Tensor                  # η, float64 0-d
    hyper_lr: Tensor            # β (changes only with alpha > 0)
    prev_update: list[Tensor]   # u_{t-1}, the previous direction (gradient sign)


class SgdTangent(NamedTuple):
    """The tangent of ``dynamics="sgd"`` in a ``MartheState``: :math:`Z^x` only.

    Example:
        >>> tx = hypergrad_lr("marthe", init_lr=0.1, hyper_lr=1e-3)
        >>> tx.init([torch.zeros(2, 3)]).tangent.x[0].shape
        torch.Size([2, 3])
    """

    x: list[Tensor]             # Z^x = ∂x_t/∂η


class MomentumTangent(NamedTuple):
    """The tangent of ``dynamics="sgd_momentum"``: :math:`Z^x` and the momentum buffer's
    :math:`Z^b`.

    Example:
        >>> tx = hypergrad_lr("marthe", init_lr=0.1, hyper_lr=1e-3, dynamics="sgd_momentum")
        >>> tx.init([torch.zeros(2, 3)]).tangent._fields
        ('x', 'momentum')
    """

    x: list[Tensor]             # Z^x
    momentum: list[Tensor]      # Z^b = ∂b_{t-1}/∂η, the momentum buffer's tangent


class AdamTangent(NamedTuple):
    """The tangent of ``dynamics="adam"``: :math:`Z^x` and the moments' :math:`Z^m`,
    :math:`Z^v`.

    Example:
        >>> tx = hypergrad_lr("marthe", init_lr=0.1, hyper_lr=1e-3, dynamics="adam")
        >>> tx.init([torch.zeros(2, 3)]).tangent._fields
        ('x', 'm', 'v')
    """

    x: list[Tensor]             # Z^x
    m: list[Tensor]             # Z^m, the first moment's tangent
    v: list[Tensor]             # Z^v, the second moment's tangent


class MomentumBuffer(NamedTuple):
    """The buffers of ``dynamics="sgd_momentum"``: :math:`b_t = m b_{t-1} + d_t` (PyTorch's
    SGD convention), zeros at first.

    Example:
        >>> tx = hypergrad_lr("marthe", init_lr=0.1, hyper_lr=1e-3, dynamics="sgd_momentum")
        >>> tx.init([torch.zeros(2, 3)]).dynamics.momentum[0].shape
        torch.Size([2, 3])
    """

    momentum: list[Tensor]      # b (PyTorch SGD convention)


class AdamMoments(NamedTuple):
    """The buffers of ``dynamics="adam"``: Adam's moments m and v, not bias-corrected.

    Example:
        >>> tx = hypergrad_lr("marthe", init_lr=0.1, hyper_lr=1e-3, dynamics="adam")
        >>> tx.init([torch.zeros(2, 3)]).dynamics.v[0].shape
        torch.Size([2, 3])
    """

    m: list[Tensor]             # first moment (not bias-corrected)
    v: list[Tensor]             # second moment (not bias-corrected)


Tangent = Union[SgdTangent, MomentumTangent, AdamTangent]
Buffers = Union[EmptyState, MomentumBuffer, AdamMoments]


class MartheState(NamedTuple):
    """State of ``hypergrad_lr(mode="marthe")``: the scalars η, β, μ and c (float64 0-d
    tensors), the tangent and buffers of its ``dynamics``, and the previous training gradient
    (automatic μ only; ``None`` entries otherwise).

    Example:
        >>> tx = hypergrad_lr("marthe", init_lr=0.1, hyper_lr=1e-3, dynamics="adam")
        >>> state = tx.init([torch.zeros(2, 3)])
        >>> type(state.tangent).__name__, type(state.dynamics).__name__, state.prev_grad
        ('AdamTangent', 'AdamMoments', [None])
    """

    count: int
    lr: Tensor                  # η, float64 0-d
    hyper_lr: Tensor            # β
    mu: Tensor                  # μ (auto mode: μ₀ <= 0 until the first automatic update)
    mu_acc: Tensor              # c, the automatic μ's accumulator
    tangent: Tangent
    dynamics: Buffers
    prev_grad: list[Tensor | None]  # clipped training gradient of the previous call (auto μ)


def _scalar(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# List helpers


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """:math:`\\langle a, b\\rangle` over all leaves, accumulated in float64, as a 0-d tensor
    (no host synchronisation)."""
    if not a:
        return _scalar(0.0)
    sums = [(local_shard(x) * local_shard(y, x)).sum(dtype=torch.float64) for x, y in zip(a, b)]
    sums = sum_over_shards(sums, a)  # DTensors: the sums of the whole tensors
    return torch.stack([s.to(sums[0].device) for s in sums]).sum()


def _clipped(tensors: list[Tensor], bound: float | None) -> list[Tensor]:
    """Element-wise clamp to [-bound, bound] (new tensors), or the tensors themselves."""
    if bound is None:
        return tensors
    out = torch._foreach_clamp_min(tensors, -bound)
    torch._foreach_clamp_max_(out, bound)
    return out


def _plus_decay(g: list[Tensor], params: list[Tensor] | None, weight_decay: float
                ) -> list[Tensor]:
    """:math:`g + \\lambda x` (new tensors), or ``g`` itself when λ = 0."""
    if weight_decay == 0.0:
        return g
    assert params is not None
    return torch._foreach_add(g, params, alpha=weight_decay)


def _like(source: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    return [s.to(z.dtype) for s, z in zip(source, like)]


# ----------------------------------------------------------------------------------------------
# Hyper-step: η, β and μ


def _warn(message: str) -> None:
    """One fixed text per event, so Python's default filter shows it once, not every step."""
    warnings.warn(f"{_NAME}: {message}", RuntimeWarning, stacklevel=_caller_stacklevel())


def _descend_lr(lr: float, hyper_lr: float, hypergrad: float, min_lr: float | None) -> float:
    """:math:`\\eta \\leftarrow \\max(\\eta - \\beta h, \\text{floor})`, floor = ``min_lr`` or
    ``LR_FLOOR_FACTOR`` η; warns when the step alone would make η <= 0."""
    proposed = lr - hyper_lr * hypergrad
    floor = min_lr if min_lr is not None else LR_FLOOR_FACTOR * lr
    if proposed <= 0.0:
        _warn("a hypergradient step would make the learning rate zero or negative; it is "
              "clamped to the floor (min_lr, else LR_FLOOR_FACTOR times the rate before the "
              "step), so the step stays a descent step. Lower hyper_lr (or alpha), or set "
              "min_lr.")
    return max(proposed, floor)


def _adapt_hyper_lr(hyper_lr: float, alpha: float, hypergrad: float, lr: float) -> float:
    """AdaTune's rule :math:`\\beta \\leftarrow \\max(\\beta + \\alpha h \\eta, 0)` (η updated)."""
    return max(hyper_lr + alpha * hypergrad * lr, 0.0)


def _auto_mu(mu: float, mu_acc: float, lr: float, val_dot_grad: float) -> tuple[float, float]:
    """AdaTune's automatic μ (§7.5.4): :math:`z = \\mathrm{clip}(\\eta / \\langle e, b\\rangle,
    0, 1)`, :math:`c \\leftarrow c\\,\\mathrm{sign}(\\mu) + \\mu`, :math:`\\mu = z^{1/(c+1)}`;
    unchanged when :math:`\\langle e, b\\rangle` is 0 or not finite."""
    if val_dot_grad == 0.0 or not math.isfinite(val_dot_grad):
        return mu, mu_acc
    z = min(max(lr / val_dot_grad, 0.0), 1.0)
    sign = float((mu > 0.0) - (mu < 0.0))
    mu_acc = mu_acc * sign + mu
    return z ** (1.0 / (mu_acc + 1.0)), mu_acc


# ----------------------------------------------------------------------------------------------
# Dynamics: direction D_t from the gradient d_t = g_t + λ x_t (gradient sign; x <- x - η D)


class _AdamTerms(NamedTuple):
    m_hat: list[Tensor]
    root: list[Tensor]          # sqrt(v-hat)
    denom: list[Tensor]         # sqrt(v-hat) + eps
    c1: float
    c2: float


def _momentum_direction(buffers: MomentumBuffer, d: list[Tensor], momentum: float,
                        nesterov: bool) -> tuple[MomentumBuffer, list[Tensor]]:
    """:math:`b_t = m b_{t-1} + d_t`; :math:`D_t = b_t`, or :math:`d_t + m b_t` (Nesterov)."""
    b = list(torch._foreach_mul(buffers.momentum, momentum))  # state lists: one per leaf
    torch._foreach_add_(b, d)
    direction = torch._foreach_add(d, b, alpha=momentum) if nesterov else b
    return MomentumBuffer(b), direction


def _adam_direction(moments: AdamMoments, d: list[Tensor], b1: float, b2: float, eps: float,
                    t: int) -> tuple[AdamMoments, list[Tensor], _AdamTerms]:
    """:math:`m_t = \\beta_1 m + (1-\\beta_1) d_t`, :math:`v_t = \\beta_2 v + (1-\\beta_2)
    d_t^2`, :math:`D_t = \\hat m / (\\sqrt{\\hat v} + \\epsilon)` (optax's eps convention)."""
    m = list(torch._foreach_lerp(moments.m, d, 1.0 - b1))      # state lists: one per leaf
    v = list(torch._foreach_mul(moments.v, b2))
    torch._foreach_addcmul_(v, d, d, 1.0 - b2)
    c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    m_hat = torch._foreach_div(m, c1)
    root = torch._foreach_div(v, c2)
    torch._foreach_sqrt_(root)
    denom = torch._foreach_add(root, eps)
    return AdamMoments(m, v), torch._foreach_div(m_hat, denom), _AdamTerms(m_hat, root, denom,
                                                                           c1, c2)


# ----------------------------------------------------------------------------------------------
# Tangents (§7.5.2). ``curvature`` is H~Z = H Z^x + λ Z^x, or None where the tangent restarts
# from B_t (first call, μ = 0, first_order): Z^x = -D_t and the other blocks 0.


def _restart(tangent: Tangent, direction: list[Tensor]) -> None:
    for block in tangent[1:]:
        torch._foreach_zero_(block)
    torch._foreach_zero_(tangent.x)
    torch._foreach_sub_(tangent.x, direction)


def _carry_x(x: list[Tensor], change: list[Tensor], direction: list[Tensor],
             mu: float | Tensor, lr: float | Tensor) -> None:
    """:math:`Z^x \\leftarrow \\mu (Z^x - \\eta_J\\,\\delta) - D_t`, in place (μ and η_J may be
    0-d tensors)."""
    torch._foreach_sub_(x, torch._foreach_mul(change, lr))
    torch._foreach_mul_(x, mu)
    torch._foreach_sub_(x, direction)


def _sgd_tangent(tangent: SgdTangent, curvature: list[Tensor], direction: list[Tensor],
                 mu: float | Tensor, lr: float | Tensor) -> None:
    """:math:`Z^x \\leftarrow \\mu (Z^x - \\eta_J \\tilde H Z^x) - D_t`."""
    _carry_x(tangent.x, curvature, direction, mu, lr)


def _momentum_tangent(tangent: MomentumTangent, curvature: list[Tensor],
                      direction: list[Tensor], mu: float | Tensor, lr: float | Tensor,
                      momentum: float,
                      nesterov: bool) -> None:
    """:math:`M = \\tilde H Z^x + m Z^b`; :math:`Z^x \\leftarrow \\mu (Z^x - \\eta_J M) - D_t`
    (Nesterov: :math:`\\tilde H Z^x + m M` for M); :math:`Z^b \\leftarrow \\mu M`."""
    m_change = torch._foreach_add(curvature, tangent.momentum, alpha=momentum)
    x_change = torch._foreach_add(curvature, m_change, alpha=momentum) if nesterov else m_change
    _carry_x(tangent.x, x_change, direction, mu, lr)
    torch._foreach_mul_(m_change, mu)
    torch._foreach_copy_(tangent.momentum, m_change)


def _adam_tangent(tangent: AdamTangent, curvature: list[Tensor], direction: list[Tensor],
                  terms: _AdamTerms, d: list[Tensor], mu: float | Tensor, lr: float | Tensor,
                  b1: float,
                  b2: float) -> None:
    """:math:`M = \\beta_1 Z^m + (1-\\beta_1) \\tilde H Z^x`,
    :math:`V = \\beta_2 Z^v + 2(1-\\beta_2)\\, d_t \\odot \\tilde H Z^x`,

    .. math::  \\delta D = \\frac{M}{c_1(\\sqrt{\\hat v} + \\epsilon)}
               - \\frac{\\hat m \\odot V}{2 c_2 \\sqrt{\\hat v}(\\sqrt{\\hat v} + \\epsilon)^2}

    (0 where :math:`\\hat v = 0`: the numerator vanishes there and the denominator is floored at
    the smallest normal number); :math:`Z^x \\leftarrow \\mu (Z^x - \\eta_J \\delta D) - D_t`,
    :math:`Z^m \\leftarrow \\mu M`, :math:`Z^v \\leftarrow \\mu V`."""
    m_change = torch._foreach_lerp(tangent.m, curvature, 1.0 - b1)
    v_change = torch._foreach_mul(tangent.v, b2)
    torch._foreach_addcmul_(v_change, d, curvature, 2.0 * (1.0 - b2))
    delta = torch._foreach_div(m_change, terms.denom)
    torch._foreach_div_(delta, terms.c1)
    second = torch._foreach_mul(terms.denom, terms.denom)
    torch._foreach_mul_(second, terms.root)
    torch._foreach_mul_(second, 2.0 * terms.c2)
    torch._foreach_clamp_min_(second, [torch.finfo(r.dtype).tiny for r in terms.root])
    numerator = torch._foreach_mul(terms.m_hat, v_change)
    torch._foreach_div_(numerator, second)
    torch._foreach_sub_(delta, numerator)
    _carry_x(tangent.x, delta, direction, mu, lr)
    torch._foreach_mul_(m_change, mu)
    torch._foreach_mul_(v_change, mu)
    torch._foreach_copy_(tangent.m, m_change)
    torch._foreach_copy_(tangent.v, v_change)


# ----------------------------------------------------------------------------------------------
# Extras


def _missing(extra: str, t: int, why: str, how: str) -> ValueError:
    return ValueError(f"{_NAME}(mode='marthe') needs the {extra!r} extra on call {t} ({why}): "
                      f"{how}")


def _validation_gradient(extras: Mapping[str, Any], updates: Tree, t: int
                         ) -> list[Tensor] | None:
    val = extras.get("val_grads")
    if val is None:
        if t == 1:
            return None
        raise _missing("val_grads", t, "the gradient of the validation loss at the current "
                       "parameters, for the hyper-step",
                       "pass val_grads=... (shaped like the parameters) to update, or with an "
                       "optimizer pass val_closure=... (a function returning the validation "
                       "loss) to step()")
    check_structure(val, updates, "val_grads")
    return leaves(val)


def _hessian_products(extras: Mapping[str, Any], updates: Tree, vectors: list[Tensor], t: int
                      ) -> list[Tensor]:
    hvp: Callable[[Tree], Tree] | None = extras.get("hvp")
    if hvp is None:
        raise _missing("hvp", t, "a callable v -> H v of the same minibatch loss, since mu > 0 "
                       "and first_order is False",
                       "pass hvp=... to update, or with an optimizer call "
                       "loss.backward(create_graph=opt.needs_hvp()) or pass a closure to "
                       "step(); mu=0 or first_order=True train without it")
    products = [h.to(z.dtype) for h, z in
                zip(hessian_vector_products(hvp, updates, vectors), vectors)]
    # the tangent is updated in place: never keep a product that is the vector itself
    return [h.clone() if h.data_ptr() == z.data_ptr() else h for h, z in zip(products, vectors)]


# ----------------------------------------------------------------------------------------------
# Validation


def _check_params_for_decay(weight_decay: float, params: Tree | None) -> None:
    if weight_decay and params is None:
        raise ValueError(f"{_NAME} with weight_decay needs the parameters: "
                         "call update(updates, state, params)")


def _check_unused(owner: str, options: Mapping[str, tuple[Any, Any]]) -> None:
    """``ValueError`` for an option changed from its default that ``owner`` does not read."""
    for name, (value, default) in options.items():
        if value != default:
            raise ValueError(f"{_NAME}: {name} does not apply to {owner}; leave it at "
                             f"{default!r}")


def _check_mu(mu: Any) -> None:
    if mu == "auto":
        return
    check_number("mu", mu)
    if not -1.0 < float(mu) <= 1.0:
        raise ValueError(f"mu must be in [0, 1] (a fixed discount), in (-1, 0) (automatic, "
                         f"AdaTune's mu_0) or 'auto', got {mu}")


def _check_grad_clip(grad_clip: Any) -> float | None:
    if grad_clip is None or grad_clip == 0:
        return None
    check_positive("grad_clip", grad_clip)
    return float(grad_clip)


def _check_min_lr(min_lr: Any, init_lr: float) -> float | None:
    if min_lr is None:
        return None
    check_positive("min_lr", min_lr)
    if min_lr > init_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed init_lr ({init_lr})")
    return float(min_lr)


# ----------------------------------------------------------------------------------------------
# The transform


def hypergrad_lr(mode: str, init_lr: float, hyper_lr: float, *, mu: float | str = 0.99999,
                 alpha: float = 0.0, grad_clip: float | None = None, first_order: bool = False,
                 dynamics: str = "sgd", momentum: float = 0.9, nesterov: bool = False,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_in_jacobian: str = "current", min_lr: float | None = None,
                 clip_training_grad: bool = False) -> GradientTransformation:
    r"""A learning rate learned online by hypergradient descent (HD, RTHO, MARTHE); terminal.

    Every call t (from 1) first takes a hyper-step on the learning rate, with the hypergradient
    :math:`h_t = \partial E/\partial\eta` and the hyper learning rate β,

    .. math::
        \eta \leftarrow \max(\eta - \beta h_t,\ \text{floor}), \qquad
        \beta \leftarrow \max(\beta + \alpha\, h_t\, \eta, 0)

    (AdaTune's β rule, α = ``alpha``, 0 keeps β fixed), then outputs the step with the new η.

    **mode="hd"** (Baydin et al., 2018): after a chain that produces the direction :math:`u_t`
    (gradient sign: the gradient, a momentum buffer, Adam's direction),

    .. math::
        h_t = -\langle \mathrm{clip}(g_t + \lambda x_t),\ \mathrm{clip}(u_{t-1})\rangle,
        \qquad o_t = -\eta_t\, u_t

    with :math:`g_t` the raw gradient (the ``grads`` extra that ``chain`` adds) and
    :math:`u_0 = 0`, so :math:`\eta_1 = \eta_0`. ``weight_decay`` λ adds the L2 term that
    AdaTune's HD-SGD/HD-Adam include in the gradient (set it to the λ of the chain's
    ``add_decayed_weights``). One global h per step and per parameter group.

    **mode="marthe"** (Donini et al., 2020; RTHO is ``mu=1``): the incoming updates are the
    raw training gradient :math:`g_t`, and the transform runs ``dynamics`` itself on
    :math:`d_t = g_t + \lambda x_t` (L2), :math:`x_{t+1} = x_t - \eta_t D_t`:

    - ``"sgd"``: :math:`D_t = d_t`;
    - ``"sgd_momentum"``: :math:`b_t = m b_{t-1} + d_t`, :math:`D_t = b_t` (or
      :math:`d_t + m b_t` with ``nesterov``), PyTorch's convention;
    - ``"adam"``: :math:`D_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)`, optax's eps convention.

    It carries the tangent :math:`Z_t \approx \partial(x_t, \text{buffers})/\partial\eta`,
    :math:`Z_{t+1} = \mu A_t Z_t + B_t` (A: Jacobian of the step, through the ``hvp`` extra
    :math:`v \mapsto H_t v` of the same minibatch loss at :math:`x_t`; :math:`B_t = -D_t` in the
    x-block; exact formulas in ALGORITHMS.md §7.5.2, with :math:`\eta_J` = η, or
    ``init_lr`` with ``lr_in_jacobian="initial"`` as AdaTune), and the hypergradient
    :math:`h_t = \langle \mathrm{clip}(e_t), Z^x_t\rangle` with :math:`e_t` the ``val_grads``
    extra, the validation gradient at the current parameters. With μ = 1 and β = 0,
    :math:`Z^x_t` is exactly :math:`\partial x_t/\partial\eta`; μ = 0 (or ``first_order``) is
    the one-step :math:`Z^x_{t+1} = -D_t`, so :math:`\eta \leftarrow \eta + \beta\langle e_{t+1},
    D_t\rangle`. ``mu`` in (-1, 0) adapts μ automatically (AdaTune, μ₀ = ``mu``; "auto" is the
    limit μ₀ → 0⁻): on each hyper-step :math:`c \leftarrow c\,\mathrm{sign}(\mu) + \mu`,
    :math:`\mu = \mathrm{clip}(\eta/\langle e_t, \hat g_{t-1}\rangle, 0, 1)^{1/(c+1)}` (skipped
    when the product is 0); until the first such update the tangent uses μ = 0.

    ``grad_clip`` (None or 0: off) clamps element-wise copies of what enters the hypergradient:
    :math:`e_t`, the Hessian-vector product, and the training gradient :math:`\hat g_t` from
    which the tangent's :math:`B_t` (and Adam's derivative terms) are computed;
    ``clip_training_grad=True`` clips the gradient of the training step too, as AdaTune does.

    Extras: ``val_grads`` on every call but the first (else ``ValueError``); ``hvp`` on calls
    t >= 2 when μ > 0 and not ``first_order`` (``needs_hvp(state)``: always then in auto mode,
    where the product is skipped while μ = 0). Needs ``params`` when λ > 0.

    Safeguards: a hyper-step that would make η <= 0 is clamped to the floor (``min_lr`` if
    given, else ``LR_FLOOR_FACTOR`` = 1e-3 times η before the step) with a ``RuntimeWarning``
    (AdaTune lets η go negative, i.e. ascend); a non-finite h skips the hyper-step (η, β, μ
    kept) with a ``RuntimeWarning``; ``min_lr`` also floors η on every step.

    Defaults: mu 0.99999 (AdaTune's CLI), alpha 0, grad_clip None, dynamics "sgd", momentum
    0.9, b1 0.9, b2 0.999, eps 1e-8 (Adam dynamics need eps > 0), weight_decay 0,
    lr_in_jacobian "current", min_lr None. Options of another mode or dynamics must stay at
    their defaults (momentum may also be 0). Valid: init_lr > 0, hyper_lr >= 0, alpha >= 0,
    mu in (-1, 1] or "auto", momentum in (0, 1) for "sgd_momentum", b1 and b2 in [0, 1),
    0 < min_lr <= init_lr.

    State (``HDState``): ``lr``, ``hyper_lr``, ``prev_update``, ``count``. (``MartheState``):
    ``lr``, ``hyper_lr``, ``mu``, ``mu_acc``, ``count`` (scalars: float64 0-d tensors),
    ``tangent`` (``x``; ``momentum`` or ``m``, ``v``), ``dynamics`` (``momentum`` or ``m``,
    ``v``) and ``prev_grad`` (auto μ only); per-parameter lists are float32 for 16-bit
    parameters. Read the learning rate with ``hypergrad_lr_value(state)``.

    Example:
        >>> from gradchain.chains.combinators import chain
        >>> tx = chain(hypergrad_lr("hd", init_lr=0.1, hyper_lr=0.01))
        >>> x = [torch.tensor([1.0])]                         # f = x^2, g = 2x
        >>> state = tx.init(x)
        >>> for _ in range(2):
        ...     out, state = tx.update([2 * x[0]], state, x)
        ...     x = [x[0] + out[0]]
        >>> round(hypergrad_lr_value(state), 6), x            # eta = 0.1 + 0.01 * 1.6 * 2
        (0.132, [tensor([0.5888])])
        >>> tx = hypergrad_lr("marthe", init_lr=0.1, hyper_lr=1e-3, mu=1.0)
        >>> state = tx.init(x)
        >>> out, state = tx.update([2 * x[0]], state, x)      # first call: no hvp, no val_grads
        >>> tx.needs_hvp(state)
        True
        >>> out, state = tx.update([2 * x[0]], state, x, hvp=lambda v: [2 * v[0]],
        ...                        val_grads=[2 * x[0]])
    """
    check_choice("mode", mode, _MODES)
    check_choice("dynamics", dynamics, _DYNAMICS)
    check_choice("lr_in_jacobian", lr_in_jacobian, _LR_IN_JACOBIAN)
    check_constant(_NAME, init_lr=init_lr, hyper_lr=hyper_lr, alpha=alpha, momentum=momentum,
                   b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    check_positive("init_lr", init_lr)
    check_non_negative("hyper_lr", hyper_lr)
    check_non_negative("alpha", alpha)
    check_non_negative("weight_decay", weight_decay)
    for name, value in (("momentum", momentum), ("b1", b1), ("b2", b2), ("eps", eps)):
        check_number(name, value)
    _check_mu(mu)
    clip = _check_grad_clip(grad_clip)
    floor = _check_min_lr(min_lr, init_lr)
    if mode == "hd":
        _check_unused("mode 'hd' (the chain before it sets the dynamics)", {
            "mu": (mu, 0.99999), "first_order": (first_order, False),
            "dynamics": (dynamics, "sgd"), "momentum": (momentum, 0.9),
            "nesterov": (nesterov, False), "b1": (b1, 0.9), "b2": (b2, 0.999), "eps": (eps, 1e-8),
            "lr_in_jacobian": (lr_in_jacobian, "current"),
            "clip_training_grad": (clip_training_grad, False)})
        return _hd(float(init_lr), float(hyper_lr), float(alpha), clip, float(weight_decay),
                   floor)
    if dynamics != "sgd_momentum":
        _check_unused(f"dynamics {dynamics!r}", {"nesterov": (nesterov, False)})
        if momentum not in (0.0, 0.9):
            raise ValueError(f"{_NAME}: momentum {momentum} needs dynamics 'sgd_momentum' "
                             f"(got {dynamics!r}); leave it at 0.9 or 0")
    if dynamics != "adam":
        _check_unused(f"dynamics {dynamics!r}", {"b1": (b1, 0.9), "b2": (b2, 0.999),
                                                 "eps": (eps, 1e-8)})
    if dynamics == "sgd_momentum" and not 0.0 < float(momentum) < 1.0:
        raise ValueError(f"momentum must be in (0, 1) for dynamics 'sgd_momentum' (use "
                         f"dynamics 'sgd' for none), got {momentum}")
    if dynamics == "adam":
        check_decay("b1", b1)
        check_decay("b2", b2)
        check_positive("eps", eps)
    if clip_training_grad and clip is None:
        raise ValueError("clip_training_grad=True needs grad_clip > 0")
    config = _MartheConfig(
        init_lr=float(init_lr), hyper_lr=float(hyper_lr), alpha=float(alpha),
        auto_mu=mu == "auto" or float(mu) < 0.0, mu0=0.0 if mu == "auto" else float(mu),
        clip=clip, first_order=bool(first_order), dynamics=dynamics, momentum=float(momentum),
        nesterov=bool(nesterov), b1=float(b1), b2=float(b2), eps=float(eps),
        weight_decay=float(weight_decay), jacobian_initial=lr_in_jacobian == "initial",
        min_lr=floor, clip_training_grad=bool(clip_training_grad))
    return _marthe(config)


def hypergrad_lr_value(state: Any) -> float:
    """The current learning rate η of the one ``hypergrad_lr`` in ``state`` (its own state, or a
    chain's or combinator's state that holds exactly one).

    Example:
        >>> tx = hypergrad_lr("hd", init_lr=0.05, hyper_lr=1e-3)
        >>> hypergrad_lr_value(tx.init([torch.zeros(2)]))
        0.05
    """
    return float(find_state(state, (HDState, MartheState), "hypergrad_lr").lr)


# ----------------------------------------------------------------------------------------------
# HD


def _hyper_step(lr: float, hyper_lr: float, hypergrad: float, alpha: float,
                min_lr: float | None) -> tuple[float, float] | None:
    """New (η, β), or None (with a warning) when the hypergradient is not finite."""
    if not math.isfinite(hypergrad):
        _warn("a hypergradient is not finite; that hyper-step is skipped and the learning "
              "rate kept")
        return None
    lr = _descend_lr(lr, hyper_lr, hypergrad, min_lr)
    return lr, _adapt_hyper_lr(hyper_lr, alpha, hypergrad, lr)


@torch.compiler.disable
def _hd_hyper_step(lr: Tensor, hyper_lr: Tensor, hypergrad: Tensor, alpha: float,
                   min_lr: float | None) -> tuple[Tensor, Tensor]:
    """``_hyper_step`` on the state's 0-d tensors: the scalar branches and warnings run
    eagerly (one host synchronisation), and a compiled step receives the new η and β as
    tensors, so their values never specialise (recompile) it."""
    stepped = _hyper_step(float(lr), float(hyper_lr), float(hypergrad), alpha, min_lr)
    return (lr, hyper_lr) if stepped is None else (_scalar(stepped[0]), _scalar(stepped[1]))


def _hd(init_lr: float, hyper_lr: float, alpha: float, clip: float | None, weight_decay: float,
        min_lr: float | None) -> GradientTransformation:

    def init(params: Tree) -> HDState:
        return HDState(count=0, lr=_scalar(init_lr), hyper_lr=_scalar(hyper_lr),
                       prev_update=zeros_like_state(leaves(params)))

    def update(updates: Tree, state: HDState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        t = state.count + 1
        if not u:
            return updates, state._replace(count=t)
        check_dense_real(u, _NAME)
        if extras.get("grads") is None:
            raise ValueError(f"{_NAME}(mode='hd') needs the 'grads' extra (the raw gradient): "
                             "put it in a chain, which adds it, or pass grads=... to update")
        _check_params_for_decay(weight_decay, params)
        lr, beta = state.lr, state.hyper_lr
        if t > 1:  # u_0 = 0: no hyper-step on the first call
            g = _plus_decay(leaves(extras["grads"]), None if params is None else leaves(params),
                            weight_decay)
            hypergrad = -_dot(_clipped(_like(g, u), clip), _clipped(state.prev_update, clip))
            lr, beta = _hd_hyper_step(lr, beta, hypergrad, alpha, min_lr)
        torch._foreach_copy_(local_shards(state.prev_update), local_shards(u, state.prev_update))
        out = writable(u, extras)
        torch._foreach_mul_(out, -lr)                      # o = -eta u
        return as_tree(updates, out), HDState(t, lr, beta, state.prev_update)

    return GradientTransformation(init, update, terminal=True)


# ----------------------------------------------------------------------------------------------
# MARTHE / RTHO


class _MartheConfig(NamedTuple):
    init_lr: float
    hyper_lr: float
    alpha: float
    auto_mu: bool
    mu0: float
    clip: float | None
    first_order: bool
    dynamics: str
    momentum: float
    nesterov: bool
    b1: float
    b2: float
    eps: float
    weight_decay: float
    jacobian_initial: bool
    min_lr: float | None
    clip_training_grad: bool


def _init_tangent_and_buffers(dynamics: str, p: list[Tensor]) -> tuple[Tangent, Buffers]:
    if dynamics == "sgd":
        return SgdTangent(zeros_like_state(p)), EmptyState()
    if dynamics == "sgd_momentum":
        return (MomentumTangent(zeros_like_state(p), zeros_like_state(p)),
                MomentumBuffer(zeros_like_state(p)))
    return (AdamTangent(zeros_like_state(p), zeros_like_state(p), zeros_like_state(p)),
            AdamMoments(zeros_like_state(p), zeros_like_state(p)))


def _marthe(cfg: _MartheConfig) -> GradientTransformation:

    def init(params: Tree) -> MartheState:
        p = leaves(params)
        check_whole(p, f"{_NAME}(mode='marthe') (RTHO, MARTHE)", "its tangent needs "
                    "Hessian-vector products, hence the gradient's graph, which FSDP2's "
                    "reduce-scattered gradients do not carry, and validation gradients",
                    instead=CURVATURE_INSTEAD)
        tangent, buffers = _init_tangent_and_buffers(cfg.dynamics, p)
        prev_grad = zeros_like_state(p) if cfg.auto_mu else [None] * len(p)
        return MartheState(count=0, lr=_scalar(cfg.init_lr), hyper_lr=_scalar(cfg.hyper_lr),
                           mu=_scalar(cfg.mu0), mu_acc=_scalar(0.0), tangent=tangent,
                           dynamics=buffers, prev_grad=prev_grad)

    def direction(buffers: Buffers, d: list[Tensor], t: int
                  ) -> tuple[Buffers, list[Tensor], _AdamTerms | None]:
        if cfg.dynamics == "sgd":
            return buffers, d, None
        if cfg.dynamics == "sgd_momentum":
            return (*_momentum_direction(buffers, d, cfg.momentum, cfg.nesterov), None)
        return _adam_direction(buffers, d, cfg.b1, cfg.b2, cfg.eps, t)

    def carry_tangent(tangent: Tangent, curvature: list[Tensor] | None, d: list[Tensor],
                      step: list[Tensor], terms: _AdamTerms | None, mu: float, lr: float
                      ) -> None:
        if curvature is None:
            _restart(tangent, step)
        elif cfg.dynamics == "sgd":
            _sgd_tangent(tangent, curvature, step, mu, lr)
        elif cfg.dynamics == "sgd_momentum":
            _momentum_tangent(tangent, curvature, step, mu, lr, cfg.momentum, cfg.nesterov)
        else:
            _adam_tangent(tangent, curvature, step, terms, d, mu, lr, cfg.b1, cfg.b2)

    @torch.compiler.disable
    def hyper_step(state: MartheState, hypergrad: Tensor, val_dot_grad: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """New (η, β, μ, μ-accumulator) as 0-d tensors, computed eagerly (see
        ``_hd_hyper_step``)."""
        lr, beta = float(state.lr), float(state.hyper_lr)
        stepped = _hyper_step(lr, beta, float(hypergrad), cfg.alpha, cfg.min_lr)
        if stepped is None:
            return state.lr, state.hyper_lr, state.mu, state.mu_acc
        lr, beta = stepped
        mu, mu_acc = state.mu, state.mu_acc
        if val_dot_grad is not None:
            mu, mu_acc = map(_scalar, _auto_mu(float(mu), float(mu_acc), lr, float(val_dot_grad)))
        return _scalar(lr), _scalar(beta), mu, mu_acc

    def update(updates: Tree, state: MartheState, params: Tree | None = None, **extras: Any):
        g = leaves(updates)
        t = state.count + 1
        if not g:
            return updates, state._replace(count=t)
        check_dense_real(g, _NAME)
        _check_params_for_decay(cfg.weight_decay, params)
        p = None if params is None else leaves(params)
        val = _validation_gradient(extras, updates, t)
        z = state.tangent.x
        lr, beta, mu, mu_acc = state.lr, state.hyper_lr, state.mu, state.mu_acc
        if val is not None and t > 1:
            e = _clipped(_like(val, z), cfg.clip)
            lr, beta, mu, mu_acc = hyper_step(
                state, _dot(e, z), _dot(e, state.prev_grad) if cfg.auto_mu else None)
        # a fixed mu is a constant; the automatic one a tensor (the tangent is carried while
        # it is 0 too, which equals the restart)
        tangent_mu = 0.0 if cfg.first_order else mu.clamp(min=0.0) if cfg.auto_mu else \
            max(cfg.mu0, 0.0)
        curvature = None
        if (cfg.auto_mu or tangent_mu > 0.0) and not cfg.first_order and t > 1:
            # Z^x_1 = 0: no product on the first call
            curvature = _clipped(_hessian_products(extras, updates, z, t), cfg.clip)
            if cfg.weight_decay:
                curvature = torch._foreach_add(curvature, z, alpha=cfg.weight_decay)
        if cfg.clip_training_grad:
            g = _clipped(g, cfg.clip)
        g_hat = g if cfg.clip_training_grad else _clipped(g, cfg.clip)
        d = _plus_decay(g, p, cfg.weight_decay)
        d_hat = d if g_hat is g else _plus_decay(g_hat, p, cfg.weight_decay)
        buffers, step_hat, terms = direction(state.dynamics, d_hat, t)
        lr_jacobian = cfg.init_lr if cfg.jacobian_initial else lr
        carry_tangent(state.tangent, curvature, d_hat, step_hat, terms, tangent_mu, lr_jacobian)
        if d_hat is d:
            step = step_hat
        else:
            buffers, step, _ = direction(state.dynamics, d, t)
        if cfg.auto_mu:
            torch._foreach_copy_(state.prev_grad, g_hat)
        out = torch._foreach_mul(step, -lr)  # a 0-d step would promote to lr's float64
        out = [o.to(d.dtype) for o, d in zip(out, step)]
        return as_tree(updates, out), MartheState(
            t, lr, beta, mu, mu_acc, state.tangent, buffers,
            state.prev_grad)

    def needs_hvp(state: MartheState) -> bool:
        return not cfg.first_order and state.count > 0 and (cfg.auto_mu or cfg.mu0 > 0.0)

    return GradientTransformation(init, update, terminal=True, needs_hvp=needs_hvp)
