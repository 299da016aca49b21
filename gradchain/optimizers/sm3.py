"""``SM3`` with the names, signature and defaults of the torch-SM3 package."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from typing_extensions import Unpack

from gradchain.chains.sm3 import sm3
from gradchain.core import GradientTransformation, check_decay, check_non_negative
from gradchain.optimizers.adapter import AdapterOptions, ChainOptimizer

__all__ = ["SM3"]


def _sm3(lr: float, momentum: float, beta: float, eps: float) -> GradientTransformation:
    check_non_negative("lr", lr)
    check_decay("momentum", momentum)
    check_decay("beta", beta)
    check_non_negative("eps", eps)
    return sm3(lr, momentum, 1.0 if beta == 0 else beta, eps)


class SM3(ChainOptimizer):
    """SM3-II, as torch-SM3's ``SM3``: ``beta = 0`` accumulates sums of squares, ``beta > 0``
    exponential moving averages (``b2 = beta``).

    Recipe ``chains.sm3``; state keys ``sm3.mu.0``, ``sm3.mu.1``, ... (one accumulator per axis
    of a parameter of rank >= 2, one of the parameter's shape otherwise), ``sm3.momentum`` (a
    buffer when momentum > 0) and ``step``. Unlike torch-SM3, a sparse gradient leaves the
    accumulators of its absent rows alone, and with ``beta > 0`` the accumulators are moving
    averages rather than running maxima (ALGORITHMS.md §10 rows 1-2). For the authors' warm-up
    and cool-down, use ``ChainOptimizer(params, chains.sm3, warmup_steps=..., total_steps=...)``
    or one of torch's LR schedulers.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SM3(model.parameters(), lr=0.1)
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.0,
                 beta: float = 0.0, eps: float = 1e-30, **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _sm3, lr=lr, momentum=momentum, beta=beta, eps=eps,
                         **options)
