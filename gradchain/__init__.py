"""gradchain: optimizers as chains of small gradient transformations, for PyTorch.

Example:
    >>> import torch, gradchain
    >>> from gradchain.transforms import scale_by_adam, add_decayed_weights, scale_by_learning_rate
    >>> tx = gradchain.chain(scale_by_adam(), add_decayed_weights(0.1), scale_by_learning_rate(1e-3))
    >>> opt = gradchain.optimizers.ChainOptimizer(torch.nn.Linear(2, 2).parameters(), tx)
"""

from typing import Any

import torch

from gradchain import chains, optimizers, schedules, transforms
from gradchain.chains import chain, named_chain
from gradchain.core import GradientTransformation, apply_updates

__version__ = "0.1.0"


def mechanize(base: Any, **options: Any) -> Any:
    """Mechanic's learned learning-rate scale around ``base`` (ALGORITHMS.md §6, §8.3).

    - a ``torch.optim.Optimizer`` class (torch's or gradchain's): a subclass that rescales the
      displacement of every base step (``gradchain.optimizers.mechanize``);
    - a ``GradientTransformation``, or a recipe (a function of hyperparameters returning one):
      the same, as a chain ending in ``transforms.mechanic_scale``
      (``gradchain.chains.mechanize``).

    ``options`` are Mechanic's: ``s_decay`` (0.01), ``betas`` (0.9 ... 0.999999), ``s_init``
    (1e-6 for the default ``variant="optax"``, 1e-8 for ``"pytorch"``), ``eps`` (1e-8),
    ``store_delta`` (False) and ``variant``; for a class also ``keep_copy`` (False; True keeps
    the copy of the parameters between steps, a second parameter-sized buffer, for speed),
    which a transform or a recipe refuses with a TypeError.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = mechanize(torch.optim.SGD)(model.parameters(), lr=1.0)
        >>> tx = mechanize(chains.adamw)(learning_rate=1.0, weight_decay=0.1)
    """
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return optimizers.mechanize(base, **options)
    return chains.mechanize(base, **options)


__all__ = [
    "GradientTransformation",
    "apply_updates",
    "chain",
    "named_chain",
    "mechanize",
    "chains",
    "optimizers",
    "schedules",
    "transforms",
]
