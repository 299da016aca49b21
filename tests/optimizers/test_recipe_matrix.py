"""Every named optimizer, and two mechanized ones, through the situations of real training:
float64 and bfloat16 parameters, a zero-size parameter, parameters without a gradient on some
steps, all-zero gradients, param groups added mid-training under an LR scheduler, and
zero_grad(set_to_none=False)."""

from __future__ import annotations

import pytest
import torch
from recipes import ALL, make, step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def linear_problem(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen).to(dtype))
    b = torch.nn.Parameter(torch.zeros(6, dtype=dtype))
    x = torch.randn(16, 4, generator=gen).to(dtype)
    return w, b, lambda: torch.tanh(x @ w.T + b).float().square().mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_float64_and_bfloat16_parameters_train_in_their_dtype(name, dtype):
    w, b, loss_fn = linear_problem(dtype)
    start = w.detach().clone()
    optimizer = make(name, [w, b], store_delta=dtype == torch.bfloat16)
    for _ in range(30):  # Mechanic's scale starts at 1e-6: its first steps are invisible in bf16
        step(name, optimizer, loss_fn)
    assert w.dtype == dtype and torch.isfinite(w.float()).all()
    assert not torch.equal(w.detach(), start), f"{name} did not move {dtype} parameters"


@pytest.mark.parametrize("name", ALL)
def test_a_zero_size_parameter_is_carried_along(name):
    w, b, loss_fn = linear_problem()
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    optimizer = make(name, [w, empty, b])
    for _ in range(3):
        step(name, optimizer, lambda: loss_fn() + empty.sum())
    assert empty.shape == (0, 3) and torch.isfinite(w).all()


@pytest.mark.parametrize("name", ALL)
def test_a_parameter_without_gradient_does_not_move_on_that_step(name):
    w, b, loss_fn = linear_problem()
    extra = torch.nn.Parameter(torch.full((6, 4), 0.1))
    optimizer = make(name, [w, extra, b])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=gen)
    with_extra = lambda: loss_fn() + torch.tanh(x @ (w + extra).T).square().mean()  # noqa: E731
    for t in range(6):
        if t % 2:
            before = extra.detach().clone()
            step(name, optimizer, loss_fn)
            assert torch.equal(extra.detach(), before), f"{name} moved a parameter without grad"
        else:
            step(name, optimizer, with_extra)
    assert torch.isfinite(extra).all() and torch.isfinite(w).all()


@pytest.mark.parametrize("name", ALL)
def test_all_zero_gradients_keep_everything_finite(name):
    w, b, _ = linear_problem()
    optimizer = make(name, [w, b])
    for _ in range(4):
        step(name, optimizer, lambda: (w * 0).sum() + (b * 0).sum())
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("name", ALL)
def test_groups_added_mid_training_under_a_scheduler(name):
    w, b, loss_fn = linear_problem()
    c = torch.nn.Parameter(torch.full((4,), 0.5))
    optimizer = make(name, [w])
    total = lambda: loss_fn() + (c - 1).square().sum()  # noqa: E731
    step(name, optimizer, total)
    optimizer.add_param_group({"params": [b], "lr": optimizer.param_groups[0]["lr"] / 10})
    step(name, optimizer, total)
    optimizer.add_param_group({"params": [c]})
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    lrs = [group["lr"] for group in optimizer.param_groups]
    c_start = c.detach().clone()
    for _ in range(3):
        step(name, optimizer, total)
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [lr / 8 for lr in lrs]
    assert not torch.equal(c.detach(), c_start)
    assert all(torch.isfinite(p).all() for p in (w, b, c))


@pytest.mark.parametrize("name", ALL)
def test_zero_grad_without_set_to_none_gives_the_same_run(name):
    runs = []
    for set_to_none in (True, False):
        w, b, loss_fn = linear_problem()
        optimizer = make(name, [w, b])
        for _ in range(4):
            step(name, optimizer, loss_fn, set_to_none=set_to_none)
        runs.append(torch.cat([w.detach().reshape(-1), b.detach()]))
    assert torch.equal(*runs)

