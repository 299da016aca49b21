"""Every named optimizer (and mechanized ones): state_dict -> torch.save -> torch.load with
weights_only=True -> a fresh optimizer on a copy of the model -> continue, bit for bit equal to
the uninterrupted run."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import gradchain
from gradchain.optimizers import OPTIMIZERS, AdamW
from gradchain.tasks.charlm import DEFAULT_HYPERPARAMETERS

VALIDATED = {"rtho", "marthe"}
X, Y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1)
X_VAL, Y_VAL = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)), torch.randn(16, 1)


def make(name: str, params):
    if name == "mechanize:sgd":
        return gradchain.mechanize(torch.optim.SGD)(params, lr=1.0, momentum=0.9)
    if name == "mechanize:adamw":
        return gradchain.mechanize(AdamW)(params, lr=1.0, weight_decay=0.01)
    hyperparameters = {"lr": 1e-3, **DEFAULT_HYPERPARAMETERS.get(name, {})}
    if name == "esgd":  # curvature from the first steps
        hyperparameters.update(d_warmup=1, update_d_every=2)
    return OPTIMIZERS[name](params, **hyperparameters)


def step(name: str, optimizer, model) -> None:
    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        return loss

    if name in VALIDATED:
        optimizer.step(closure, val_closure=lambda: torch.nn.functional.mse_loss(model(X_VAL),
                                                                                  Y_VAL))
    else:
        optimizer.step(closure)


@pytest.mark.parametrize("name", [*OPTIMIZERS, "mechanize:sgd", "mechanize:adamw"])
def test_save_load_with_weights_only_continues_bit_identically(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = make(name, model.parameters())
    for _ in range(4):
        step(name, optimizer, model)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = make(name, resumed_model.parameters())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(4):
        step(name, optimizer, model)
        step(name, resumed, resumed_model)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), f"{name} diverged after resuming"
