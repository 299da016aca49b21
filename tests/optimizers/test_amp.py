"""torch.amp.GradScaler with every named optimizer, under CPU bfloat16 autocast: with a power-of-two
scale the run equals the unscaled run bit for bit, and a step whose gradients hold an inf is
skipped with the parameters and the optimizer state untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from recipes import ALL, NEEDS_MORE_THAN_GRADS, make

# GradScaler.step passes no closure and no validation gradient
NAMES = [name for name in ALL if name not in NEEDS_MORE_THAN_GRADS]


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.randn(32, 8), torch.randn(32, 1)


def loss_of(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.nn.functional.mse_loss(model(x).float(), y)


def flat_state(optimizer) -> list[torch.Tensor]:
    tensors = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            tensors.append(node.detach().clone())
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(optimizer.state_dict())
    return tensors


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_steps_equal_unscaled_steps_and_inf_steps_are_skipped(name):
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    optimizer, reference = make(name, model.parameters()), make(name, twin.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    for step in range(5):
        optimizer.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        if step == 2:  # an overflow: the step is skipped and the scale halves
            next(model.parameters()).grad[0, 0] = float("inf")
            params_before = [p.detach().clone() for p in model.parameters()]
            state_before = flat_state(optimizer)
        scaler.step(optimizer)
        scaler.update()
        if step == 2:
            assert scaler.get_scale() == 2.0 ** 7
            assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
            after = flat_state(optimizer)
            assert len(after) == len(state_before)
            assert all(torch.equal(a, b) for a, b in zip(state_before, after))
            continue
        reference.zero_grad()
        loss_of(twin, x, y).backward()
        reference.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"{name}: step {step} differs from the unscaled run"
