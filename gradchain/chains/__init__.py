"""Combinators and named recipes: everything that builds a transform out of transforms."""

from gradchain.chains.combinators import (
    apply_if_finite,
    chain,
    freeze,
    inject_hyperparams,
    masked,
    multi_steps,
    named_chain,
    partition,
)
from gradchain.chains.esgd import esgd_m
from gradchain.chains.recipes import adam, adamw, sgd
from gradchain.chains.sm3 import sm3

__all__ = [
    "chain",
    "named_chain",
    "masked",
    "partition",
    "freeze",
    "inject_hyperparams",
    "multi_steps",
    "apply_if_finite",
    "sgd",
    "adam",
    "adamw",
    "sm3",
    "esgd_m",
]
