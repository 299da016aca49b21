"""HeavyBall's eleven optimizers with its 0.8 names, keywords and defaults, over the recipes of
``chains.heavyball``.

Each class also answers to HeavyBall's own name (``ForeachSOAP`` is ``SOAP``). Differences from
HeavyBall 0.8 are fixes of its defects (ALGORITHMS.md §10): weight decay shrinks the weights,
the schedule-free SOAP classes apply it, bf16 schedule-free iterates move, ADOPT has no one-step
lag, ``warmup_steps=0`` works, SOAP's eigenvalue order and dimension merging follow the fixed
rules, and the preconditioner schedule is deterministic. bfloat16 parameters are written with
stochastic rounding by default, as HeavyBall does (``stochastic_rounding=False`` rounds to
nearest). ``heavyball_debias=True`` on the PaLM classes reproduces HeavyBall's debiasing of
PaLM's β₂; by default β₂(k) is used as is (its EMA needs no bias correction).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from typing_extensions import Unpack

from gradchain.chains import heavyball as recipes
from gradchain.core import GradientTransformation
from gradchain.optimizers.adapter import AdapterOptions, ChainOptimizer
from gradchain.transforms.schedule_free import to_eval, to_train

__all__ = [
    "AdamWInplace", "LaProp", "ADOPT", "SFAdamW", "PaLMSFAdamW", "SOAP", "PaLMSOAP",
    "SFPaLMSOAP", "PrecondScheduleSFPaLMSOAP", "PrecondSchedulePaLMSOAP", "PrecondScheduleSOAP",
    "ForeachAdamW", "ForeachLaProp", "ForeachADOPT", "ForeachSFAdamW", "PaLMForeachSFAdamW",
    "ForeachSOAP", "PaLMForeachSOAP", "SFPaLMForeachSOAP", "PrecondScheduleSFPaLMForeachSOAP",
    "PrecondSchedulePaLMForeachSOAP", "PrecondScheduleForeachSOAP",
]

Betas = tuple[float, float]
PaLMBetas = tuple[float | None, float | None]


def _first(beta: float, betas: PaLMBetas) -> float:
    """HeavyBall's PaLM classes take ``beta``, or ``betas[0]`` when it is given."""
    return beta if betas[0] is None else betas[0]


# ----------------------------------------------------------------------------------------------
# Recipes in HeavyBall's keywords


class _WithBetas:
    """An Adam-like recipe in HeavyBall's keywords (``betas`` as a pair); an object rather
    than a closure, so that the optimizer pickles."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe
        self.__name__ = recipe.__name__

    def __call__(self, lr: float, betas: Betas, eps: float, weight_decay: float,
                 warmup_steps: int) -> GradientTransformation:
        return self.recipe(lr, betas[0], betas[1], eps, weight_decay, warmup_steps)


def _sfadamw(lr: float, betas: Betas, eps: float, weight_decay: float, warmup_steps: int,
             r: float, weight_lr_power: float) -> GradientTransformation:
    return recipes.sfadamw(lr, betas[0], betas[1], eps, weight_decay, warmup_steps, r,
                           weight_lr_power)


def _palm_sfadamw(lr: float, beta: float, betas: PaLMBetas, eps: float, weight_decay: float,
                  warmup_steps: int, r: float, weight_lr_power: float, beta2_scale: float,
                  heavyball_debias: bool) -> GradientTransformation:
    return recipes.palm_sfadamw(lr, _first(beta, betas), beta2_scale, eps, weight_decay,
                                warmup_steps, r, weight_lr_power, heavyball_debias)


def _soap(lr: float, betas: Betas, shampoo_beta: float | None, eps: float, weight_decay: float,
          precondition_frequency: int, max_precond_dim: int, merge_dims: bool,
          precondition_1d: bool, normalize_grads: bool, warmup_steps: int
          ) -> GradientTransformation:
    return recipes.soap(lr, betas[0], betas[1], shampoo_beta, eps, weight_decay,
                        precondition_frequency, max_precond_dim, merge_dims, precondition_1d,
                        normalize_grads, warmup_steps)


def _palm_soap(lr: float, beta: float, betas: PaLMBetas, shampoo_beta: float | None, eps: float,
               weight_decay: float, precondition_frequency: int, max_precond_dim: int,
               merge_dims: bool, precondition_1d: bool, normalize_grads: bool,
               warmup_steps: int, beta2_scale: float, heavyball_debias: bool
               ) -> GradientTransformation:
    return recipes.palm_soap(lr, _first(beta, betas), beta2_scale, shampoo_beta, eps,
                             weight_decay, precondition_frequency, max_precond_dim, merge_dims,
                             precondition_1d, normalize_grads, warmup_steps, heavyball_debias)


def _sf_palm_soap(lr: float, beta: float, betas: PaLMBetas, beta2_scale: float, eps: float,
                  weight_decay: float, precondition_frequency: int, max_precond_dim: int,
                  merge_dims: bool, precondition_1d: bool, normalize_grads: bool,
                  warmup_steps: int, r: float, weight_lr_power: float,
                  gradient_clip_val: float, heavyball_debias: bool) -> GradientTransformation:
    return recipes.sf_palm_soap(lr, _first(beta, betas), beta2_scale, eps, weight_decay,
                                precondition_frequency, max_precond_dim, merge_dims,
                                precondition_1d, normalize_grads, warmup_steps, r,
                                weight_lr_power, gradient_clip_val, heavyball_debias)


def _ps_sf_palm_soap(lr: float, beta: float, betas: PaLMBetas, beta2_scale: float, eps: float,
                     weight_decay: float, precond_scheduler: tuple[float, float],
                     max_precond_dim: int, merge_dims: bool, precondition_1d: bool,
                     normalize_grads: bool, warmup_steps: int, r: float,
                     weight_lr_power: float, gradient_clip_val: float, heavyball_debias: bool
                     ) -> GradientTransformation:
    return recipes.precond_schedule_sf_palm_soap(
        lr, _first(beta, betas), beta2_scale, eps, weight_decay, precond_scheduler,
        max_precond_dim, merge_dims, precondition_1d, normalize_grads, warmup_steps, r,
        weight_lr_power, gradient_clip_val, heavyball_debias)


def _ps_palm_soap(lr: float, beta: float, betas: PaLMBetas, shampoo_beta: float | None,
                  eps: float, weight_decay: float, precond_scheduler: tuple[float, float],
                  max_precond_dim: int, merge_dims: bool, precondition_1d: bool,
                  normalize_grads: bool, warmup_steps: int, beta2_scale: float,
                  heavyball_debias: bool) -> GradientTransformation:
    return recipes.precond_schedule_palm_soap(
        lr, _first(beta, betas), beta2_scale, shampoo_beta, eps, weight_decay,
        precond_scheduler, max_precond_dim, merge_dims, precondition_1d, normalize_grads,
        warmup_steps, heavyball_debias)


def _ps_soap(lr: float, betas: Betas, shampoo_beta: float | None, eps: float,
             weight_decay: float, precond_scheduler: tuple[float, float], max_precond_dim: int,
             merge_dims: bool, precondition_1d: bool, normalize_grads: bool, warmup_steps: int
             ) -> GradientTransformation:
    return recipes.precond_schedule_soap(lr, betas[0], betas[1], shampoo_beta, eps,
                                         weight_decay, precond_scheduler, max_precond_dim,
                                         merge_dims, precondition_1d, normalize_grads,
                                         warmup_steps)


# ----------------------------------------------------------------------------------------------
# Classes


class _ScheduleFree(ChainOptimizer):
    """Parameters hold y while training; ``eval()`` swaps in the average x, ``train()`` swaps
    y back (HeavyBall's ``eval``/``train``); ``step`` refuses to run in evaluation mode."""

    _training = True

    def eval(self) -> None:
        """Write the averaged parameters x into the model, for evaluation or saving."""
        if self._training:
            self._swap(to_eval)
            self._training = False

    def train(self) -> None:
        """Write the training parameters y back (undoes ``eval()``)."""
        if not self._training:
            self._swap(to_train)
            self._training = True

    def _swap(self, convert: Any) -> None:
        for index, group in enumerate(self.param_groups):
            state = self.chain_state(index)
            if state is not None:
                b1 = _first(group.get("beta", 0.0), group.get("betas", (None, None)))
                convert(state, dict(zip(self._names(group), group["params"])), b1)

    def step(self, closure: Any = None) -> Any:
        if not self._training:
            raise RuntimeError("the parameters hold the schedule-free average (eval mode); call "
                               "optimizer.train() before optimizer.step()")
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        """The adapter's state dict, plus ``"training"``: which of y (True) or x the parameters
        held when it was taken, so that a model saved with it is switched back correctly."""
        return {**super().state_dict(), "training": self._training}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        training = state_dict.pop("training", True)
        super().load_state_dict(state_dict)
        self._training = bool(training)


class _AdamLike(ChainOptimizer):
    """The common signature of the Adam-like classes; ``_recipe_of`` names the recipe."""

    _recipe_of: Any

    def __init__(self, params: Iterable[Any], lr: float = 0.0025, betas: Betas = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, *,
                 stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _WithBetas(self._recipe_of), **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, betas=betas,
                         eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps)


class AdamWInplace(_AdamLike):
    """AdamW with in-place debiased moments and eps as a floor (HeavyBall's ``ForeachAdamW``;
    recipe ``chains.adamw_inplace``). State keys ``adam.mu``, ``adam.nu``, ``adam.count``.

    Example:
        >>> opt = AdamWInplace(torch.nn.Linear(4, 2).parameters(), lr=1e-3, warmup_steps=10)
    """

    _recipe_of = staticmethod(recipes.adamw_inplace)


class LaProp(_AdamLike):
    """LaProp (HeavyBall's ``ForeachLaProp``; recipe ``chains.laprop``).

    Example:
        >>> opt = LaProp(torch.nn.Linear(4, 2).parameters(), lr=1e-3)
    """

    _recipe_of = staticmethod(recipes.laprop)


class ADOPT(_AdamLike):
    """ADOPT, HeavyBall style without its one-step lag (``ForeachADOPT``; recipe
    ``chains.adopt``). The first step only measures the second moment.

    Example:
        >>> opt = ADOPT(torch.nn.Linear(4, 2).parameters(), lr=1e-3)
    """

    _recipe_of = staticmethod(recipes.adopt)


class SFAdamW(_ScheduleFree):
    """Schedule-free AdamW (``ForeachSFAdamW``; recipe ``chains.sfadamw``). Call ``eval()``
    before evaluating and ``train()`` before training again.

    Example:
        >>> opt = SFAdamW(torch.nn.Linear(4, 2).parameters(), lr=1e-3, warmup_steps=10)
        >>> opt.eval(); opt.train()
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0025, betas: Betas = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, *,
                 stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _sfadamw, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, betas=betas,
                         eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                         weight_lr_power=weight_lr_power)


class PaLMSFAdamW(_ScheduleFree):
    """Schedule-free AdamW with PaLM's β₂ (``PaLMForeachSFAdamW``; recipe
    ``chains.palm_sfadamw``).

    Example:
        >>> opt = PaLMSFAdamW(torch.nn.Linear(4, 2).parameters(), lr=1e-3, beta2_scale=0.8)
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0025, beta: float = 0.9,
                 betas: PaLMBetas = (None, None), eps: float = 1e-8, weight_decay: float = 0.0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 beta2_scale: float = 0.8, *, heavyball_debias: bool = False,
                 stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _palm_sfadamw, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, beta=beta,
                         betas=betas, eps=eps, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                         beta2_scale=beta2_scale, heavyball_debias=heavyball_debias)


class SOAP(ChainOptimizer):
    """SOAP (``ForeachSOAP``; recipe ``chains.soap``). The first step only initialises the
    eigenbases. State keys ``soap.mu``, ``soap.nu``, ``soap.gram.<axis>``,
    ``soap.basis.<axis>``, ``soap.count``.

    Example:
        >>> opt = SOAP(torch.nn.Linear(4, 2).parameters(), lr=3e-3, precondition_frequency=10)
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: Betas = (0.9, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.01, precondition_frequency: int = 2,
                 max_precond_dim: int = 2048, merge_dims: bool = True,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 warmup_steps: int = 1, *, stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _soap, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, betas=betas,
                         shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                         precondition_frequency=precondition_frequency,
                         max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                         precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                         warmup_steps=warmup_steps)


class PaLMSOAP(ChainOptimizer):
    """SOAP with PaLM's β₂ (``PaLMForeachSOAP``; recipe ``chains.palm_soap``).

    Example:
        >>> opt = PaLMSOAP(torch.nn.Linear(4, 2).parameters(), lr=3e-3)
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, beta: float = 0.9,
                 betas: PaLMBetas = (None, None), shampoo_beta: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 2,
                 max_precond_dim: int = 2048, merge_dims: bool = True,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 warmup_steps: int = 1, beta2_scale: float = 0.8, *,
                 heavyball_debias: bool = False, stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _palm_soap, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, beta=beta,
                         betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                         weight_decay=weight_decay,
                         precondition_frequency=precondition_frequency,
                         max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                         precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                         warmup_steps=warmup_steps, beta2_scale=beta2_scale,
                         heavyball_debias=heavyball_debias)


class SFPaLMSOAP(_ScheduleFree):
    """Schedule-free PaLM-SOAP with adaptive gradient clipping (``SFPaLMForeachSOAP``; recipe
    ``chains.sf_palm_soap``).

    Example:
        >>> opt = SFPaLMSOAP(torch.nn.Linear(4, 2).parameters(), lr=3e-3)
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, beta: float = 0.9,
                 beta2_scale: float = 0.8, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 2, max_precond_dim: int = 2048,
                 merge_dims: bool = True, precondition_1d: bool = False,
                 normalize_grads: bool = False, warmup_steps: int = 1, r: float = 0.0,
                 weight_lr_power: float = 2.0, gradient_clip_val: float = 0.1,
                 betas: PaLMBetas = (None, None), *, heavyball_debias: bool = False,
                 stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _sf_palm_soap, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, beta=beta,
                         betas=betas, beta2_scale=beta2_scale, eps=eps,
                         weight_decay=weight_decay,
                         precondition_frequency=precondition_frequency,
                         max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                         precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                         gradient_clip_val=gradient_clip_val, heavyball_debias=heavyball_debias)


class PrecondScheduleSFPaLMSOAP(_ScheduleFree):
    """Schedule-free PaLM-SOAP on the preconditioner schedule
    (``PrecondScheduleSFPaLMForeachSOAP``; recipe ``chains.precond_schedule_sf_palm_soap``).

    Example:
        >>> opt = PrecondScheduleSFPaLMSOAP(torch.nn.Linear(4, 2).parameters(), lr=3e-3)
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, beta: float = 0.9,
                 beta2_scale: float = 0.8, eps: float = 1e-8, weight_decay: float = 0.01,
                 max_precond_dim: int = 2048, merge_dims: bool = True,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 warmup_steps: int = 1, r: float = 0.0, weight_lr_power: float = 2.0,
                 gradient_clip_val: float = 0.1,
                 precond_scheduler: tuple[float, float] = (1 / 3, 9),
                 betas: PaLMBetas = (None, None), *, heavyball_debias: bool = False,
                 stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _ps_sf_palm_soap, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr,
                         beta=beta, betas=betas, beta2_scale=beta2_scale, eps=eps,
                         weight_decay=weight_decay, precond_scheduler=precond_scheduler,
                         max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                         precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                         gradient_clip_val=gradient_clip_val, heavyball_debias=heavyball_debias)


class PrecondSchedulePaLMSOAP(ChainOptimizer):
    """PaLM-SOAP on the preconditioner schedule (``PrecondSchedulePaLMForeachSOAP``, the
    HeavyBall README's recommendation; recipe ``chains.precond_schedule_palm_soap``).

    Example:
        >>> opt = PrecondSchedulePaLMSOAP(torch.nn.Linear(4, 2).parameters(), lr=3e-3)
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, beta: float = 0.9,
                 shampoo_beta: float | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.01, max_precond_dim: int = 2048,
                 merge_dims: bool = True, precondition_1d: bool = False,
                 normalize_grads: bool = False, warmup_steps: int = 1,
                 precond_scheduler: tuple[float, float] = (1 / 3, 9),
                 betas: PaLMBetas = (None, None), beta2_scale: float = 0.8, *,
                 heavyball_debias: bool = False, stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _ps_palm_soap, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, beta=beta,
                         betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                         weight_decay=weight_decay, precond_scheduler=precond_scheduler,
                         max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                         precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                         warmup_steps=warmup_steps, beta2_scale=beta2_scale,
                         heavyball_debias=heavyball_debias)


class PrecondScheduleSOAP(ChainOptimizer):
    """SOAP on the preconditioner schedule (``PrecondScheduleForeachSOAP``; recipe
    ``chains.precond_schedule_soap``).

    Example:
        >>> opt = PrecondScheduleSOAP(torch.nn.Linear(4, 2).parameters(), lr=3e-3)
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: Betas = (0.9, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.01, max_precond_dim: int = 2048,
                 merge_dims: bool = True, precondition_1d: bool = False,
                 normalize_grads: bool = False, warmup_steps: int = 1,
                 precond_scheduler: tuple[float, float] = (1 / 3, 9), *,
                 stochastic_rounding: bool = True,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _ps_soap, **options,
                         stochastic_rounding=stochastic_rounding, lr=lr, betas=betas,
                         shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                         precond_scheduler=precond_scheduler, max_precond_dim=max_precond_dim,
                         merge_dims=merge_dims, precondition_1d=precondition_1d,
                         normalize_grads=normalize_grads, warmup_steps=warmup_steps)


# HeavyBall's names
ForeachAdamW = AdamWInplace
ForeachLaProp = LaProp
ForeachADOPT = ADOPT
ForeachSFAdamW = SFAdamW
PaLMForeachSFAdamW = PaLMSFAdamW
ForeachSOAP = SOAP
PaLMForeachSOAP = PaLMSOAP
SFPaLMForeachSOAP = SFPaLMSOAP
PrecondScheduleSFPaLMForeachSOAP = PrecondScheduleSFPaLMSOAP
PrecondSchedulePaLMForeachSOAP = PrecondSchedulePaLMSOAP
PrecondScheduleForeachSOAP = PrecondScheduleSOAP
