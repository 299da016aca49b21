"""``HDSGD``, ``HDAdam``, ``RTHO`` and ``MARTHE``: AdaTune's hypergradient learning rates as
``torch.optim`` optimizers.

Each parameter group learns its own learning rate, which lives in the optimizer state (key
``hypergrad.lr``; a checkpoint resumes from it). ``group["lr"]`` keeps the configured initial
value; ``group["learned_lr"]`` shows the current one after every step (a view, never read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import Unpack

from gradchain.chains.hypergrad import hd_adam, hd_sgd, marthe, rtho
from gradchain.core import GradientTransformation
from gradchain.distributed import refusing_data_parallel
from gradchain.optimizers.adapter import AdapterOptions, ChainOptimizer
from gradchain.transforms.hypergrad import hypergrad_lr_value

__all__ = ["HDSGD", "HDAdam", "RTHO", "MARTHE"]

Betas = tuple[float, float]

_VALIDATION_UNDER_DDP = (
    "RTHO and MARTHE take the validation gradient with torch.autograd.grad, which "
    "DistributedDataParallel does not average across processes (each would learn its own "
    "learning rate), and their hyper-steps need Hessian-vector products, which DDP cannot "
    "synchronise. Train them without DDP, or use hd-sgd or hd-adam, which learn the learning "
    "rate from the training gradient and run under DDP")


def _hd_sgd(lr: float, momentum: float, weight_decay: float, nesterov: bool,
            hypergrad_lr: float) -> GradientTransformation:
    return hd_sgd(lr, hypergrad_lr, momentum, nesterov, weight_decay)


def _hd_adam(lr: float, betas: Betas, eps: float, weight_decay: float, hypergrad_lr: float
             ) -> GradientTransformation:
    return hd_adam(lr, hypergrad_lr, betas[0], betas[1], eps, weight_decay)


def _marthe(lr: float, hyper_lr: float, mu: float | str, alpha: float, grad_clip: float | None,
            dynamics: str, momentum: float, nesterov: bool, betas: Betas, eps: float,
            weight_decay: float, first_order: bool, lr_in_jacobian: str, min_lr: float | None,
            clip_training_grad: bool) -> GradientTransformation:
    return marthe(lr, hyper_lr, mu, alpha, grad_clip, dynamics, momentum, nesterov, betas[0],
                  betas[1], eps, weight_decay, first_order, lr_in_jacobian, min_lr,
                  clip_training_grad)


def _rtho(lr: float, hyper_lr: float, dynamics: str, momentum: float, nesterov: bool,
          betas: Betas, eps: float, weight_decay: float, alpha: float, grad_clip: float | None,
          lr_in_jacobian: str, min_lr: float | None, clip_training_grad: bool
          ) -> GradientTransformation:
    return rtho(lr, hyper_lr, dynamics, momentum, nesterov, betas[0], betas[1], eps,
                weight_decay, alpha, grad_clip, lr_in_jacobian, min_lr, clip_training_grad)


class _LearnedLR(ChainOptimizer):
    """Keeps ``group["learned_lr"]`` equal to the group's current learning rate."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["learned_lr"] = None if callable(group["lr"]) else float(group["lr"])

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; returns the closure's loss, if any. Then ``group["learned_lr"]`` holds
        the learning rate that the step used."""
        loss = self._step(closure, None)
        self._refresh_learned_lr()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._refresh_learned_lr()

    def _refresh_learned_lr(self) -> None:
        for index, group in enumerate(self.param_groups):
            state = self.chain_state(index)
            if state is not None:
                group["learned_lr"] = hypergrad_lr_value(state)


class _Validated(_LearnedLR):
    """A step that also takes the validation gradient (RTHO, MARTHE)."""

    #: Training loops (``tasks.charlm.train``) hold validation data out for such optimizers
    #: and pass ``val_closure`` to ``step``.
    uses_validation = True

    def step(self, closure: Callable[[], Any] | None = None,  # type: ignore[override]
             val_closure: Callable[[], Tensor] | None = None,
             val_grads: Sequence[Tensor | None] | None = None) -> Any:
        """One step; returns the closure's loss, if any.

        From the second step on, the hyper-step needs the gradient of a validation loss at the
        current parameters (before this step's update): give ``val_closure``, a function that
        returns that loss (without calling ``backward``; its gradient is taken with
        ``torch.autograd.grad``, ``.grad`` is untouched), or ``val_grads``, one tensor (or None
        for zero) per parameter in the order of ``param_groups``. On the first step neither is
        needed (nor evaluated).
        """
        if val_closure is not None and val_grads is not None:
            raise ValueError("pass val_closure or val_grads, not both")
        if self._hyper_steps_next():
            if val_closure is not None:
                val_grads = self._validation_gradient(val_closure)
            elif val_grads is None:
                raise ValueError(
                    f"{type(self).__name__}.step needs the validation gradient from the second "
                    "step on: pass val_closure=... (a function returning the validation loss at "
                    "the current parameters) or val_grads=[...] (one tensor per parameter)")
        loss = self._step(closure, None if val_grads is None else {"val_grads": val_grads})
        self._refresh_learned_lr()
        return loss

    def _hyper_steps_next(self) -> bool:
        return any(self.chain_state(i) is not None for i in range(len(self.param_groups)))

    def _validation_gradient(self, val_closure: Callable[[], Tensor]) -> list[Tensor | None]:
        params = [p for group in self.param_groups for p in group["params"]]
        trainable = [p for p in params if p.requires_grad]
        with torch.enable_grad(), refusing_data_parallel(_VALIDATION_UNDER_DDP):
            loss = val_closure()
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        by_id = {id(p): g for p, g in zip(trainable, grads)}
        return [by_id.get(id(p)) for p in params]


class HDSGD(_LearnedLR):
    """HD-SGD: SGD whose learning rate follows the hypergradient of the training loss
    (Baydin et al., 2018), with AdaTune's ``SGDHD`` names and defaults (no dampening).

    Recipe ``chains.hypergrad.hd_sgd``; state keys ``hypergrad.lr``, ``hypergrad.hyper_lr``,
    ``hypergrad.prev_update``, ``hypergrad.count``, ``momentum.momentum`` (momentum > 0) and
    ``step``. Needs no Hessian-vector product and no validation data: train as with
    ``torch.optim.SGD``. ``lr`` is the initial learning rate, ``hypergrad_lr`` its step size.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = HDSGD(model.parameters(), lr=0.01, momentum=0.9, hypergrad_lr=1e-4)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.ones(8, 4)).square().mean().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["learned_lr"] > 0.01
        (0.01, True)
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 hypergrad_lr: float = 1e-6, **options: Unpack[AdapterOptions]
                 ) -> None:
        super().__init__(params, _hd_sgd, **options, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov, hypergrad_lr=hypergrad_lr)


class HDAdam(_LearnedLR):
    """HD-Adam: Adam (torch's eps convention, L2 weight decay) whose learning rate follows the
    hypergradient of the training loss, with AdaTune's ``AdamHD`` names and defaults.

    Recipe ``chains.hypergrad.hd_adam``; state keys ``hypergrad.lr``, ``hypergrad.hyper_lr``,
    ``hypergrad.prev_update``, ``hypergrad.count``, ``adam.mu``, ``adam.nu``, ``adam.count``
    and ``step``. Needs no Hessian-vector product and no validation data.

    Example:
        >>> opt = HDAdam(torch.nn.Linear(4, 1).parameters(), lr=1e-3, hypergrad_lr=1e-8)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Betas = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, hypergrad_lr: float = 1e-8,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _hd_adam, **options, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, hypergrad_lr=hypergrad_lr)


class MARTHE(_Validated):
    """MARTHE (Donini et al., 2020): the learning rate follows a discounted hypergradient of a
    validation loss; AdaTune's names and command-line defaults (``dynamics`` replaces its
    ``--optimizer``; ``betas`` and ``eps`` apply to ``dynamics="adam"``, ``momentum`` and
    ``nesterov`` to ``"sgd_momentum"``).

    Recipe ``chains.hypergrad.marthe``; ``mu`` in [0, 1) fixed, 1 is RTHO, (-1, 0) or "auto"
    adaptive; ``alpha`` adapts ``hyper_lr`` (0 freezes it). State keys ``hypergrad.lr``,
    ``hypergrad.hyper_lr``, ``hypergrad.mu``, ``hypergrad.mu_acc``, ``hypergrad.count``,
    ``hypergrad.tangent.*``, ``hypergrad.dynamics.*``, ``hypergrad.prev_grad`` (auto μ) and
    ``step``.

    From the second step on, each step needs a Hessian-vector product of the training loss
    (unless ``first_order`` or ``mu == 0``) and the validation gradient (see ``step``):

    .. code-block:: python

        for inputs, targets in train_loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward(create_graph=opt.needs_hvp())
            opt.step(val_closure=lambda: loss_fn(model(val_inputs), val_targets))

    or ``opt.step(closure, val_closure=...)`` with a training closure that calls
    ``loss.backward()`` (the optimizer builds the graph when needed). Gradient accumulation and
    data-parallel training are not supported (the product needs the graph of the very loss
    whose gradient is used).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MARTHE(model.parameters(), lr=0.01, weight_decay=5e-4)
        >>> for _ in range(2):
        ...     opt.zero_grad()
        ...     model(torch.ones(8, 4)).square().mean().backward(create_graph=opt.needs_hvp())
        ...     opt.step(val_closure=lambda: model(-torch.ones(8, 4)).square().mean())
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["learned_lr"] != 0.01
        (0.01, True)
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01, hyper_lr: float = 1e-8,
                 mu: float | str = 0.99999, alpha: float = 1e-6,
                 grad_clip: float | None = 100.0, dynamics: str = "sgd_momentum",
                 momentum: float = 0.9, nesterov: bool = False, betas: Betas = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, first_order: bool = False,
                 lr_in_jacobian: str = "current", min_lr: float | None = None,
                 clip_training_grad: bool = False, **options: Unpack[AdapterOptions]
                 ) -> None:
        super().__init__(params, _marthe, **options, lr=lr, hyper_lr=hyper_lr, mu=mu, alpha=alpha,
                         grad_clip=grad_clip, dynamics=dynamics, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay,
                         first_order=first_order, lr_in_jacobian=lr_in_jacobian, min_lr=min_lr,
                         clip_training_grad=clip_training_grad)


class RTHO(_Validated):
    """RTHO (Franceschi et al., 2017): the learning rate follows the exact forward-mode
    hypergradient of a validation loss (MARTHE with ``mu=1``, a fixed ``hyper_lr`` unless
    ``alpha > 0``).

    Recipe ``chains.hypergrad.rtho``; state keys and training loop as ``MARTHE``: from the
    second step on, ``loss.backward(create_graph=opt.needs_hvp())`` (or a closure) and
    ``opt.step(val_closure=...)``.

    Example:
        >>> opt = RTHO(torch.nn.Linear(4, 1).parameters(), lr=0.01, dynamics="adam", eps=1e-4)
        >>> opt.needs_hvp()  # not on the first step
        False
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01, hyper_lr: float = 1e-8,
                 dynamics: str = "sgd_momentum", momentum: float = 0.9, nesterov: bool = False,
                 betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 alpha: float = 0.0, grad_clip: float | None = 100.0,
                 lr_in_jacobian: str = "current", min_lr: float | None = None,
                 clip_training_grad: bool = False, **options: Unpack[AdapterOptions]
                 ) -> None:
        super().__init__(params, _rtho, **options, lr=lr, hyper_lr=hyper_lr, dynamics=dynamics,
                         momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                         weight_decay=weight_decay, alpha=alpha, grad_clip=grad_clip,
                         lr_in_jacobian=lr_in_jacobian, min_lr=min_lr,
                         clip_training_grad=clip_training_grad)
