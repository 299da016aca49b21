"""Every named optimizer (and mechanized ones): state_dict -> torch.save -> torch.load with
weights_only=True -> a fresh optimizer on a copy of the model -> continue, bit for bit equal to
the uninterrupted run; and copy.deepcopy / pickle of the optimizer itself."""

from __future__ import annotations

import copy
import io
import pickle

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


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ALL)
def test_a_copied_or_pickled_optimizer_continues_bit_identically_on_its_own(name, how):
    # copy.deepcopy((model, optimizer)) and a pickle round trip (torch.save of the objects),
    # as torch's optimizers allow: the copy continues as the original does, and stepping it
    # leaves the original alone
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = make(name, model.parameters())
    for _ in range(3):
        train_step(name, optimizer, model)
    pair = (model, optimizer)
    twin_model, twin = copy.deepcopy(pair) if how == "deepcopy" else \
        pickle.loads(pickle.dumps(pair))
    assert type(twin) is type(optimizer)
    before = [p.clone() for p in model.parameters()]
    for _ in range(2):
        train_step(name, twin, twin_model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for _ in range(2):
        train_step(name, optimizer, model)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q), f"{name}: the {how} diverged"


def test_a_copy_of_a_compiled_optimizer_compiles_its_own_step():
    # the compiled step reads the group's learning-rate tensor: a copy must not share it
    from gradchain.optimizers import AdamW

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    reference = copy.deepcopy(model)
    optimizer = AdamW(model.parameters(), lr=1e-2, compile=True)
    unshared = AdamW(reference.parameters(), lr=1e-2, compile=True)
    loss = lambda m: torch.nn.functional.mse_loss(m(X), Y)  # noqa: E731
    for m, opt in [(model, optimizer), (reference, unshared)]:
        step("adamw", opt, lambda m=m: loss(m))
    twin_model, twin = copy.deepcopy((model, optimizer))
    twin.param_groups[0]["lr"] = 0.5
    for _ in range(2):
        step("adamw", twin, lambda: loss(twin_model))
        step("adamw", optimizer, lambda: loss(model))
        step("adamw", unshared, lambda: loss(reference))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(twin_model.weight, model.weight)
