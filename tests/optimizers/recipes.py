"""Shared by the recipe-wide tests: every named optimizer (and mechanized ones) built with the
task's tuned hyperparameters, and one training step for each, whatever it needs."""

from __future__ import annotations

import torch

import gradchain
from gradchain.optimizers import OPTIMIZERS, AdamW
from gradchain.tasks.charlm import DEFAULT_HYPERPARAMETERS

#: Optimizers that learn from a validation gradient (step takes val_closure).
VALIDATED = {"rtho", "marthe"}
#: Those whose step needs more than .grad: a closure for curvature, or a validation gradient.
NEEDS_MORE_THAN_GRADS = {"esgd", *VALIDATED}
MECHANIZED = ["mechanize:sgd", "mechanize:adamw"]
ALL = [*OPTIMIZERS, *MECHANIZED]


def make(name: str, params, store_delta: bool = False, **options) -> torch.optim.Optimizer:
    """``store_delta`` for Mechanic on bfloat16, whose first steps are below bf16's spacing;
    ``options`` go to the optimizer (to the base of a mechanized one): ``compile``,
    ``foreach``, ``skip_nonfinite``."""
    if name == "mechanize:sgd":
        return gradchain.mechanize(torch.optim.SGD, store_delta=store_delta)(
            params, lr=1.0, momentum=0.9, **options)
    if name == "mechanize:adamw":
        return gradchain.mechanize(AdamW, store_delta=store_delta)(params, lr=1.0,
                                                                   weight_decay=0.01, **options)
    hyperparameters = {"lr": 1e-3, **DEFAULT_HYPERPARAMETERS.get(name, {})}
    if name == "esgd":  # curvature from the first steps
        hyperparameters.update(d_warmup=1, update_d_every=2)
    return OPTIMIZERS[name](params, **hyperparameters, **options)


def step(name: str, optimizer, loss_fn, val_loss_fn=None, set_to_none: bool = True):
    """One step through a closure of ``loss_fn``; validated optimizers also get
    ``val_closure`` (``val_loss_fn``, default ``loss_fn``)."""

    def closure():
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = loss_fn()
        loss.backward()
        return loss

    if name in VALIDATED:
        return optimizer.step(closure, val_closure=val_loss_fn or loss_fn)
    return optimizer.step(closure)
