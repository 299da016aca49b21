"""``torch.optim.Optimizer`` adapters: the generic ``ChainOptimizer`` and the named classes."""

from gradchain.optimizers.adapter import ChainOptimizer
from gradchain.optimizers.esgd import ESGD
from gradchain.optimizers.sm3 import SM3
from gradchain.optimizers.standard import SGD, Adam, AdamW

#: Named optimizers by lower-case name, as the command line knows them.
OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "sm3": SM3, "esgd": ESGD}

__all__ = ["ChainOptimizer", "SGD", "Adam", "AdamW", "SM3", "ESGD", "OPTIMIZERS"]
