"""``ESGD``: ESGD-M with the seed project's name, signature and defaults."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from typing_extensions import Unpack

from gradchain.chains.esgd import esgd_m
from gradchain.core import GradientTransformation
from gradchain.optimizers.adapter import AdapterOptions, ChainOptimizer

__all__ = ["ESGD"]


def _esgd(lr: float, betas: tuple[float, float], v: float | None, eps: float,
          weight_decay: float, update_d_every: int, d_warmup: int, lr_warmup: float
          ) -> GradientTransformation:
    return esgd_m(lr, betas, v, lr_warmup, eps, weight_decay, update_d_every, d_warmup)


class ESGD(ChainOptimizer):
    """ESGD-M: equilibrated SGD with quasi-hyperbolic momentum and an lr warm-up.

    Recipe ``chains.esgd.esgd_m``; ``v`` is the QH momentum's ν (None: ν = β₁, Nesterov).
    State keys ``momentum.momentum``, ``momentum.count``, ``curvature.d``,
    ``curvature.hvp_count``, ``curvature.count``, ``curvature.rng_state``, ``warmup.count`` and
    ``step``.

    Curvature steps (the first ``d_warmup``, then every ``update_d_every``-th) need a
    Hessian-vector product of the step's loss: build the double-backward graph on those steps,

    .. code-block:: python

        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

    or pass ``step`` a closure. Gradient accumulation and data-parallel training are not
    supported (the product needs the graph of the very loss whose gradient is used).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ESGD(model.parameters(), lr=0.5, betas=(0.999, 0.999), v=0.7)
        >>> opt.should_create_graph()  # the first step always estimates the curvature
        True
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), v: float | None = None,
                 eps: float = 1e-4, weight_decay: float = 0.0, update_d_every: int = 10,
                 d_warmup: int = 20, lr_warmup: float = 0.99,
                 **options: Unpack[AdapterOptions]) -> None:
        super().__init__(params, _esgd, lr=lr, betas=betas, v=v, eps=eps,
                         weight_decay=weight_decay, update_d_every=update_d_every,
                         d_warmup=d_warmup, lr_warmup=lr_warmup, **options)

    def should_create_graph(self) -> bool:
        """Whether the next ``step`` estimates the curvature in some parameter group, so that
        the gradients must come from ``loss.backward(create_graph=True)``: the seed project's
        name for ``needs_hvp()``.

        >>> opt = ESGD([torch.nn.Parameter(torch.zeros(2))])
        >>> opt.should_create_graph()
        True
        """
        return self.needs_hvp()
