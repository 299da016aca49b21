r"""HeavyBall's optimizers (0.8 defaults) as chains: in-place AdamW, LaProp, ADOPT, schedule-free
AdamW, and the SOAP family with PaLM's β₂, schedule-free averaging and the preconditioner
schedule (ALGORITHMS.md §8.5.3).

Every recipe is ``shaping -> add_decayed_weights(λ) -> scale_by_learning_rate(η·w)``, with the
warm-up factor :math:`w(k) = \min(k/W, 1)` (:math:`w \equiv 1` for W = 0). Adam-like recipes
count k from the first call; SOAP and ADOPT, whose first call only initialises, use k = count
and a factor 0 on that call, so weight decay does not act on it either. Schedule-free recipes
wrap that chain in ``schedule_free`` (weight decay at y, no momentum in the base). HeavyBall 0.8
defects are not reproduced (§10): weight decay shrinks the weights, the SF-SOAP recipes decay
them, bf16 schedule-free iterates move, ADOPT applies each step's moment at once.

Member names are checkpoint keys (``"soap.basis"``, ``"base.rms.nu"``), part of each recipe's
contract.
"""

from __future__ import annotations

from collections.abc import Callable

from gradchain.chains.combinators import named_chain
from gradchain.core import GradientTransformation, Hyper, Schedule, resolve
from gradchain.schedules import precond_schedule
from gradchain.transforms.basic import add_decayed_weights, scale_by_learning_rate
from gradchain.transforms.clipping import clip_by_agc
from gradchain.transforms.inplace import (
    scale_by_adam_inplace,
    scale_by_adopt,
    scale_by_laprop,
    scale_by_rms_inplace,
)
from gradchain.transforms.palm import palm_beta2
from gradchain.transforms.schedule_free import schedule_free
from gradchain.transforms.soap import soap_precondition

__all__ = [
    "adamw_inplace",
    "laprop",
    "adopt",
    "sfadamw",
    "palm_sfadamw",
    "soap",
    "palm_soap",
    "sf_palm_soap",
    "precond_schedule_sf_palm_soap",
    "precond_schedule_palm_soap",
    "precond_schedule_soap",
]


def warmed_up(learning_rate: Hyper, warmup_steps: int, init_call: bool = False) -> Schedule:
    """HeavyBall's warm-up: :math:`\\eta(\\text{count}) \\cdot \\min(k/W, 1)`, 1 for W = 0.

    k = count + 1, or k = count when the first call only initialises (``init_call``), which
    then gets the factor 0 whatever W.

    Example:
        >>> f = warmed_up(0.1, warmup_steps=2, init_call=True)
        >>> [f(count) for count in range(4)]
        [0.0, 0.05, 0.1, 0.1]
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")

    def schedule(count: int) -> float:
        k = count if init_call else count + 1
        if k == 0:
            return 0.0
        factor = 1.0 if warmup_steps == 0 else min(k / warmup_steps, 1.0)
        return resolve(learning_rate, count) * factor

    return schedule


def _decoupled(shaping: tuple[str, GradientTransformation], weight_decay: Hyper,
               learning_rate: Schedule) -> GradientTransformation:
    return named_chain(shaping, ("weight_decay", add_decayed_weights(weight_decay)),
                       ("lr", scale_by_learning_rate(learning_rate)))


def adamw_inplace(learning_rate: Hyper = 0.0025, b1: Hyper = 0.9, b2: Hyper = 0.99,
                  eps: float = 1e-8, weight_decay: Hyper = 0.0, warmup_steps: int = 0
                  ) -> GradientTransformation:
    r"""AdamW with in-place debiased moments and eps as a floor (HeavyBall's ``ForeachAdamW``).

    .. math::  x \leftarrow x - \eta\,w(t)\left(\frac{\hat m}{\max(\sqrt{\hat v}, \epsilon)}
               + \lambda x\right)

    Defaults η 0.0025, betas (0.9, 0.99), eps 1e-8, λ 0, W 0. Members: ``adam``,
    ``weight_decay``, ``lr``.

    Example:
        >>> tx = adamw_inplace(1e-3, weight_decay=0.01, warmup_steps=100)
    """
    return _decoupled(("adam", scale_by_adam_inplace(b1, b2, eps)), weight_decay,
                      warmed_up(learning_rate, warmup_steps))


def laprop(learning_rate: Hyper = 0.0025, b1: Hyper = 0.9, b2: Hyper = 0.99, eps: float = 1e-8,
           weight_decay: Hyper = 0.0, warmup_steps: int = 0) -> GradientTransformation:
    r"""LaProp (Ziyin et al., 2020): momentum of RMS-normalised gradients (``ForeachLaProp``).

    .. math::  \hat v \leftarrow \hat\beta_2 \hat v + (1-\hat\beta_2) g^2, \quad
               \hat m \leftarrow \hat\beta_1 \hat m + (1-\hat\beta_1)
               \frac{g}{\max(\sqrt{\hat v}, \epsilon)}, \quad
               x \leftarrow x - \eta\,w(t)(\hat m + \lambda x)

    Defaults as ``adamw_inplace``. Members: ``laprop``, ``weight_decay``, ``lr``.

    Example:
        >>> tx = laprop(1e-3)
    """
    return _decoupled(("laprop", scale_by_laprop(b1, b2, eps)), weight_decay,
                      warmed_up(learning_rate, warmup_steps))


def adopt(learning_rate: Hyper = 0.0025, b1: Hyper = 0.9, b2: Hyper = 0.99, eps: float = 1e-8,
          weight_decay: Hyper = 0.0, warmup_steps: int = 0) -> GradientTransformation:
    r"""ADOPT (Taniguchi et al., 2024), HeavyBall style (``ForeachADOPT``): normalise by the
    second moment of the *previous* gradients, then average.

    .. math::  \hat m_t = \hat\beta_1 \hat m_{t-1} + (1-\hat\beta_1)
               \frac{g_t}{\max(\sqrt{\hat v_{t-1}}, \epsilon)}, \quad
               x \leftarrow x - \eta\,w(t-1)(\hat m_t + \lambda x)

    The first call only sets :math:`\hat v_1 = g_1^2` and moves nothing; each call's moment is
    applied at once (no one-step lag). Defaults as ``adamw_inplace``. Members: ``adopt``,
    ``weight_decay``, ``lr``.

    Example:
        >>> tx = adopt(1e-3, warmup_steps=10)
    """
    return _decoupled(("adopt", scale_by_adopt(b1, b2, eps, style="heavyball")), weight_decay,
                      warmed_up(learning_rate, warmup_steps, init_call=True))


def sfadamw(learning_rate: Hyper = 0.0025, b1: float = 0.9, b2: Hyper = 0.99, eps: float = 1e-8,
            weight_decay: Hyper = 0.0, warmup_steps: int = 0, r: float = 0.0,
            weight_lr_power: float = 2.0) -> GradientTransformation:
    r"""Schedule-free AdamW (Defazio et al., 2024; ``ForeachSFAdamW``).

    The base :math:`b_t = -\eta_t\,(g/\max(\sqrt{\hat v}, \epsilon) + \lambda y)` drives z;
    the parameters hold :math:`y = (1-\beta_1) z + \beta_1 x`, x the average of the z's with
    weights :math:`\eta_t^{p}` (``schedule_free``). Use ``schedule_free_eval_params`` (or the
    optimizer's ``eval()``) to evaluate at x. Defaults η 0.0025, β₁ 0.9, β₂ 0.99, eps 1e-8,
    λ 0, W 0, r 0, p 2. Members: ``base`` (``rms``, ``weight_decay``, ``lr``), ``z``,
    ``weight_sum``.

    Example:
        >>> tx = sfadamw(1e-3, warmup_steps=100)
    """
    lr = warmed_up(learning_rate, warmup_steps)
    base = _decoupled(("rms", scale_by_rms_inplace(b2, eps)), weight_decay, lr)
    return schedule_free(base, lr, b1, weight_lr_power, r)


def palm_sfadamw(learning_rate: Hyper = 0.0025, b1: float = 0.9, beta2_scale: float = 0.8,
                 eps: float = 1e-8, weight_decay: Hyper = 0.0, warmup_steps: int = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, heavyball_debias: bool = False
                 ) -> GradientTransformation:
    r"""``sfadamw`` with PaLM's :math:`\beta_2(k) = 1 - k^{-\gamma}` (``PaLMForeachSFAdamW``),
    γ = ``beta2_scale`` (0.8); ``heavyball_debias`` reproduces HeavyBall's debiasing of it.
    Defaults η 0.0025, β₁ 0.9, γ 0.8, eps 1e-8, λ 0, W 0, r 0, p 2, heavyball_debias False.

    Example:
        >>> tx = palm_sfadamw(1e-3)
    """
    return sfadamw(learning_rate, b1, palm_beta2(beta2_scale, heavyball_debias), eps,
                   weight_decay, warmup_steps, r, weight_lr_power)


def soap(learning_rate: Hyper = 3e-3, b1: Hyper = 0.9, b2: Hyper = 0.95,
         shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: Hyper = 0.01,
         precondition_frequency: int | Callable[[int], float] = 2, max_precond_dim: int = 2048,
         merge_dims: bool = True, precondition_1d: bool = False, normalize_grads: bool = False,
         warmup_steps: int = 1) -> GradientTransformation:
    r"""SOAP (Vyas et al., 2024), HeavyBall's ``ForeachSOAP``: Adam in the eigenbasis of
    Shampoo's preconditioner, refreshed every ``precondition_frequency`` steps (or on a
    schedule such as ``schedules.precond_schedule()``), with decoupled weight decay.

    .. math::  x \leftarrow x - \eta\,w(k)\left(P^{-1}\Bigl(\frac{P(\hat m)}
               {\max(\sqrt{\hat v}, \epsilon)}\Bigr) + \lambda x\right)

    The first call only initialises the bases and moves nothing. Defaults η 3e-3, betas
    (0.9, 0.95), eps 1e-8, λ 0.01, refresh every 2, max_precond_dim 2048, merge_dims,
    W 1; ``shampoo_beta`` None makes the Gram EMA use the step's second-moment decay.
    Members: ``soap`` (``mu``, ``nu``, ``gram``, ``basis``, ...), ``weight_decay``, ``lr``.

    Example:
        >>> tx = soap(3e-3, precondition_frequency=10)
    """
    return _decoupled(
        ("soap", soap_precondition(b1, b2, shampoo_beta, eps,
                                   precondition_frequency=precondition_frequency,
                                   max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                                   precondition_1d=precondition_1d,
                                   normalize_grads=normalize_grads)),
        weight_decay, warmed_up(learning_rate, warmup_steps, init_call=True))


def palm_soap(learning_rate: Hyper = 3e-3, b1: Hyper = 0.9, beta2_scale: float = 0.8,
              shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: Hyper = 0.01,
              precondition_frequency: int | Callable[[int], float] = 2,
              max_precond_dim: int = 2048, merge_dims: bool = True,
              precondition_1d: bool = False, normalize_grads: bool = False,
              warmup_steps: int = 1, heavyball_debias: bool = False) -> GradientTransformation:
    r"""``soap`` with PaLM's :math:`\beta_2(k) = 1 - k^{-\gamma}` for the second moment and the
    Gram EMA (``PaLMForeachSOAP``), γ = ``beta2_scale`` (0.8). Other defaults as ``soap``
    (η 3e-3, β₁ 0.9, eps 1e-8, λ 0.01, refresh every 2, W 1), heavyball_debias False.

    Example:
        >>> tx = palm_soap(3e-3)
    """
    return soap(learning_rate, b1, palm_beta2(beta2_scale, heavyball_debias), shampoo_beta, eps,
                weight_decay, precondition_frequency, max_precond_dim, merge_dims,
                precondition_1d, normalize_grads, warmup_steps)


def precond_schedule_soap(learning_rate: Hyper = 3e-3, b1: Hyper = 0.9, b2: Hyper = 0.95,
                          shampoo_beta: float | None = None, eps: float = 1e-8,
                          weight_decay: Hyper = 0.01,
                          precond_scheduler: tuple[float, float] = (1 / 3, 9),
                          max_precond_dim: int = 2048, merge_dims: bool = True,
                          precondition_1d: bool = False, normalize_grads: bool = False,
                          warmup_steps: int = 1) -> GradientTransformation:
    r"""``soap`` refreshing its bases on the schedule :math:`f(k) = 1 + (a \log_{10} k)^b`
    (``PrecondScheduleForeachSOAP``; (a, b) = ``precond_scheduler`` = (1/3, 9)): nearly every
    step early on, every 2 at k = 1000, every 513 at 10⁶. Other defaults as ``soap`` (η 3e-3,
    betas (0.9, 0.95), eps 1e-8, λ 0.01, W 1).

    Example:
        >>> tx = precond_schedule_soap(3e-3)
    """
    return soap(learning_rate, b1, b2, shampoo_beta, eps, weight_decay,
                precond_schedule(*precond_scheduler), max_precond_dim, merge_dims,
                precondition_1d, normalize_grads, warmup_steps)


def precond_schedule_palm_soap(learning_rate: Hyper = 3e-3, b1: Hyper = 0.9,
                               beta2_scale: float = 0.8, shampoo_beta: float | None = None,
                               eps: float = 1e-8, weight_decay: Hyper = 0.01,
                               precond_scheduler: tuple[float, float] = (1 / 3, 9),
                               max_precond_dim: int = 2048, merge_dims: bool = True,
                               precondition_1d: bool = False, normalize_grads: bool = False,
                               warmup_steps: int = 1, heavyball_debias: bool = False
                               ) -> GradientTransformation:
    r"""``palm_soap`` on the preconditioner schedule (``PrecondSchedulePaLMForeachSOAP``, the
    HeavyBall README's recommended optimizer), (a, b) = ``precond_scheduler`` = (1/3, 9). Other
    defaults as ``palm_soap`` (η 3e-3, β₁ 0.9, γ 0.8, eps 1e-8, λ 0.01, W 1).

    Example:
        >>> tx = precond_schedule_palm_soap(3e-3)
    """
    return soap(learning_rate, b1, palm_beta2(beta2_scale, heavyball_debias), shampoo_beta, eps,
                weight_decay, precond_schedule(*precond_scheduler), max_precond_dim, merge_dims,
                precondition_1d, normalize_grads, warmup_steps)


def sf_palm_soap(learning_rate: Hyper = 3e-3, b1: float = 0.9, beta2_scale: float = 0.8,
                 eps: float = 1e-8, weight_decay: Hyper = 0.01,
                 precondition_frequency: int | Callable[[int], float] = 2,
                 max_precond_dim: int = 2048, merge_dims: bool = True,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 warmup_steps: int = 1, r: float = 0.0, weight_lr_power: float = 2.0,
                 gradient_clip_val: float = 0.1, heavyball_debias: bool = False
                 ) -> GradientTransformation:
    r"""Schedule-free PaLM-SOAP (``SFPaLMForeachSOAP``): adaptive gradient clipping of the raw
    gradient, SOAP without a first moment (β₁ = 0; the schedule-free average replaces it),
    weight decay at y, then ``schedule_free`` with β = ``b1``.

    .. math::  b_t = -\eta\,w(k)\left(P^{-1}\Bigl(\frac{P(\mathrm{agc}(g))}
               {\max(\sqrt{\hat v}, \epsilon)}\Bigr) + \lambda y\right)

    Defaults η 3e-3, β 0.9, γ 0.8, eps 1e-8, λ 0.01, refresh every 2, W 1, r 0, p 2, AGC 0.1
    (0 disables). Members: ``base`` (``agc``, ``soap``, ``weight_decay``, ``lr``), ``z``,
    ``weight_sum``.

    Example:
        >>> tx = sf_palm_soap(3e-3)
    """
    lr = warmed_up(learning_rate, warmup_steps, init_call=True)
    base = named_chain(
        ("agc", clip_by_agc(gradient_clip_val)),
        ("soap", soap_precondition(0.0, palm_beta2(beta2_scale, heavyball_debias), None, eps,
                                   precondition_frequency=precondition_frequency,
                                   max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                                   precondition_1d=precondition_1d,
                                   normalize_grads=normalize_grads)),
        ("weight_decay", add_decayed_weights(weight_decay)),
        ("lr", scale_by_learning_rate(lr)),
    )
    return schedule_free(base, lr, b1, weight_lr_power, r)


def precond_schedule_sf_palm_soap(learning_rate: Hyper = 3e-3, b1: float = 0.9,
                                  beta2_scale: float = 0.8, eps: float = 1e-8,
                                  weight_decay: Hyper = 0.01,
                                  precond_scheduler: tuple[float, float] = (1 / 3, 9),
                                  max_precond_dim: int = 2048, merge_dims: bool = True,
                                  precondition_1d: bool = False, normalize_grads: bool = False,
                                  warmup_steps: int = 1, r: float = 0.0,
                                  weight_lr_power: float = 2.0, gradient_clip_val: float = 0.1,
                                  heavyball_debias: bool = False) -> GradientTransformation:
    r"""``sf_palm_soap`` on the preconditioner schedule (``PrecondScheduleSFPaLMForeachSOAP``),
    (a, b) = ``precond_scheduler`` = (1/3, 9). Other defaults as ``sf_palm_soap`` (η 3e-3,
    β 0.9, γ 0.8, eps 1e-8, λ 0.01, W 1, r 0, p 2, AGC 0.1).

    Example:
        >>> tx = precond_schedule_sf_palm_soap(3e-3)
    """
    return sf_palm_soap(learning_rate, b1, beta2_scale, eps, weight_decay,
                        precond_schedule(*precond_scheduler), max_precond_dim, merge_dims,
                        precondition_1d, normalize_grads, warmup_steps, r, weight_lr_power,
                        gradient_clip_val, heavyball_debias)
