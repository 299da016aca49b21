"""ESGD-M (Crowson, 2022): equilibrated SGD with quasi-hyperbolic momentum, as a chain.

Member names are checkpoint keys (``"curvature.d"``), so they are part of the recipe's contract.
"""

from __future__ import annotations

from gradchain.chains.combinators import named_chain
from gradchain.core import GradientTransformation, Hyper, check_decay, check_number
from gradchain.transforms.basic import (
    add_decayed_weights,
    scale_by_learning_rate,
    scale_by_schedule,
)
from gradchain.transforms.curvature import scale_by_abs_hessian_diag
from gradchain.transforms.momentum import qh_momentum

__all__ = ["esgd_m"]


def esgd_m(learning_rate: Hyper = 1.0, betas: tuple[float, float] = (0.9, 0.999),
           v: float | None = None, lr_warmup: float = 0.99, eps: float = 1e-4,
           weight_decay: Hyper = 0.0, update_d_every: int = 10, d_warmup: int = 20
           ) -> GradientTransformation:
    r"""ESGD-M: a diagonal second-order method with quasi-hyperbolic momentum (the seed
    version of Jan 2022; Dauphin et al. 2015 for ESGD, Ma & Yarats 2019 for QHM).

    Per step t (from 1), with gradient :math:`g_t`, :math:`\nu` = ``v`` (β₁ when None, which is
    Nesterov momentum) and :math:`s_t = \eta\,(1-\rho^t)`, :math:`\rho` = ``lr_warmup``:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad
        q_t = \frac{\nu m_t + (1-\nu)\, g_t}{1 - \nu\beta_1^t}, \\
        x \leftarrow x - s_t \left(\frac{q_t}{\sqrt{\hat D_t} + \epsilon} + \lambda x\right)

    where :math:`\hat D_t` is the bias-corrected EMA (decay β₂) of squared Hessian-vector
    products with Rademacher probes, refreshed on steps 1..``d_warmup`` and then every
    ``update_d_every`` steps (``scale_by_abs_hessian_diag``). The momentum averages raw
    gradients and the current curvature divides the average. Weight decay is decoupled and
    scaled by the warmed-up learning rate (AdamW's convention); the warm-up factor
    :math:`1-\rho^t` (63% at t = 100, 95% at t = 300 for ρ = 0.99; ρ = 0 turns it off)
    multiplies any schedule of ``learning_rate``. With eps = 0 and no weight decay, rescaling
    the loss or the parameters leaves the trajectory unchanged. Learning rates are relative to a
    Newton-like step: try 1e-3 to 1. Defaults η 1.0, betas (0.9, 0.999), v None, ρ 0.99,
    eps 1e-4, λ 0, update_d_every 10, d_warmup 20.

    Needs the ``hvp`` extra on curvature steps (``needs_hvp``; with an optimizer, call
    ``loss.backward(create_graph=True)`` or pass a closure). Members: ``momentum``
    (``momentum``, ``count``), ``curvature`` (``d``, ``hvp_count``, ``count``,
    ``rng_state``), ``weight_decay``, ``warmup`` (``count``), ``lr``.

    Example:
        >>> import torch
        >>> tx = esgd_m(0.5, betas=(0.9, 0.999), weight_decay=1e-4)
        >>> x = [torch.tensor([1.0, 2.0])]
        >>> state = tx.init(x)
        >>> tx.needs_hvp(state)
        True
        >>> out, state = tx.update([2.0 * x[0]], state, x, hvp=lambda v: [2.0 * v[0]])
    """
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if callable(lr_warmup):
        raise ValueError("lr_warmup must be a number, not a schedule")
    check_decay("lr_warmup", lr_warmup)
    beta1, beta2 = betas
    if v is not None:
        check_number("v", v)
        if callable(v) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"v (the QH momentum's nu) must be a number in [0, 1], got {v!r}")
    nu = beta1 if v is None else v
    rho = float(lr_warmup)
    return named_chain(
        ("momentum", qh_momentum(beta1, nu, bias_correction="esgd")),
        ("curvature", scale_by_abs_hessian_diag(beta2, eps, update_d_every, d_warmup,
                                                bias_correction=True)),
        ("weight_decay", add_decayed_weights(weight_decay)),
        ("warmup", scale_by_schedule(lambda count: 1.0 - rho ** (count + 1))),
        ("lr", scale_by_learning_rate(learning_rate)),
    )
