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
from gradchain.chains.heavyball import (
    adamw_inplace,
    adopt,
    laprop,
    palm_sfadamw,
    palm_soap,
    precond_schedule_palm_soap,
    precond_schedule_sf_palm_soap,
    precond_schedule_soap,
    sf_palm_soap,
    sfadamw,
    soap,
)
from gradchain.chains.hypergrad import hd_adam, hd_sgd, marthe, rtho
from gradchain.chains.mechanic import mechanize
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
    "mechanize",
    "sgd",
    "adam",
    "adamw",
    "sm3",
    "esgd_m",
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
    "hd_sgd",
    "hd_adam",
    "rtho",
    "marthe",
]
