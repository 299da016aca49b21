"""``SGD``, ``Adam`` and ``AdamW`` with ``torch.optim``'s names, signatures and defaults."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from typing_extensions import Unpack

from gradchain import chains
from gradchain.core import GradientTransformation
from gradchain.optimizers.adapter import AdapterOptions, ChainOptimizer

__all__ = ["SGD", "Adam", "AdamW"]


def _sgd(lr: float, momentum: float, weight_decay: float, nesterov: bool
         ) -> GradientTransformation:
    return chains.sgd(lr, momentum, nesterov, weight_decay)


def _adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float
          ) -> GradientTransformation:
    return chains.adam(lr, betas[0], betas[1], eps, weight_decay)


def _adamw(lr: float, betas: tuple[float, float], eps: float, weight_decay: float
           ) -> GradientTransformation:
    return chains.adamw(lr, betas[0], betas[1], eps, weight_decay)


class SGD(ChainOptimizer):
    """SGD with momentum, Nesterov and L2 weight decay, as ``torch.optim.SGD``.

    Recipe ``chains.sgd``; state keys ``momentum.momentum`` (when momentum > 0) and ``step``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _sgd, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, **options)


class Adam(ChainOptimizer):
    """Adam with L2 weight decay, as ``torch.optim.Adam``.

    Recipe ``chains.adam``; state keys ``adam.mu``, ``adam.nu``, ``adam.count`` and ``step``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _adam, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, **options)


class AdamW(ChainOptimizer):
    """AdamW: Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Recipe ``chains.adamw``; state keys ``adam.mu``, ``adam.nu``, ``adam.count`` and ``step``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _adamw, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, **options)
