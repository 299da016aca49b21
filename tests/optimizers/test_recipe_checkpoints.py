"""Every named optimizer (and mechanized ones): state_dict -> torch.save -> torch.load with
weights_only=True -> a fresh optimizer on a copy of the model -> continue, bit for bit equal to
the uninterrupted run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from recipes import ALL, make, step

X, Y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1)
X_VAL, Y_VAL = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)), torch.randn(16, 1)


def train_step(name: str, optimizer, model) -> None:
    step(name, optimizer, lambda: torch.nn.functional.mse_loss(model(X), Y),
         lambda: torch.nn.functional.mse_loss(model(X_VAL), Y_VAL))


@pytest.mark.parametrize("name", ALL)
def test_save_load_with_weights_only_continues_bit_identically(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = make(name, model.parameters())
    for _ in range(4):
        train_step(name, optimizer, model)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = make(name, resumed_model.parameters())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(4):
        train_step(name, optimizer, model)
        train_step(name, resumed, resumed_model)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), f"{name} diverged after resuming"
