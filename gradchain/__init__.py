"""gradchain: optimizers as chains of small gradient transformations, for PyTorch.

Example:
    >>> import torch, gradchain
    >>> from gradchain.transforms import scale_by_adam, add_decayed_weights, scale_by_learning_rate
    >>> tx = gradchain.chain(scale_by_adam(), add_decayed_weights(0.1), scale_by_learning_rate(1e-3))
    >>> opt = gradchain.optimizers.ChainOptimizer(torch.nn.Linear(2, 2).parameters(), tx)
"""

from gradchain import chains, optimizers, schedules, transforms
from gradchain.chains import chain, named_chain
from gradchain.core import GradientTransformation, apply_updates

__version__ = "0.1.0"

__all__ = [
    "GradientTransformation",
    "apply_updates",
    "chain",
    "named_chain",
    "chains",
    "optimizers",
    "schedules",
    "transforms",
]
