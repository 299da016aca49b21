"""DistributedDataParallel on the gloo backend, two processes on this machine: every recipe
that steps on gradients alone ends with the same parameters on both ranks, and with the
parameters of one process that sees the whole global batch. Those that need Hessian-vector
products or validation gradients (ESGD, RTHO, MARTHE) refuse DDP with a clear error before
anything moves: DDP's reducer fails on gradients that keep their graph, and would not average
products or gradients taken with torch.autograd.grad."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from processes import WORLD, on_every_rank
from recipes import ALL, NEEDS_MORE_THAN_GRADS, make, step

NAMES = [name for name in ALL if name not in NEEDS_MORE_THAN_GRADS]
#: Where each of the others stops under DDP: (its failing step, counted from 1, and what the
#: error says): ESGD's first step is a curvature step; RTHO and MARTHE need their first
#: validation gradient on the second.
REFUSED = {"esgd": (1, "DistributedDataParallel cannot synchronise such gradients"),
           "rtho": (2, "DistributedDataParallel does not average"),
           "marthe": (2, "DistributedDataParallel does not average")}
# SOAP's Adam in the eigenbasis normalises the round-off that lands in the null directions of
# a rank-deficient Gram matrix (an 8 x 6 gradient's 8 x 8 Gram has two): the order of DDP's
# all-reduce moves those steps by up to ~lr, so against one process only the ranks are compared
ROUND_OFF_SENSITIVE = {name for name in NAMES if "soap" in name}
STEPS = 4

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]


def model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen))
               for _ in range(STEPS)]
    return model, batches


def train(name: str, model, batches, rank: int | None = None) -> torch.Tensor:
    optimizer = make(name, model.parameters())
    for x, y in batches:
        if rank is not None:  # this rank's half of the global batch
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def refused(name: str, model, batches, rank: int) -> dict:
    """Steps with closures until the optimizer refuses: where, why, and whether anything had
    moved at that step."""
    optimizer = make(name, model.parameters())
    val_x, val_y = batches[-1][0].chunk(WORLD)[rank], batches[-1][1].chunk(WORLD)[rank]
    for number, (x, y) in enumerate(batches, start=1):
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        before = [p.detach().clone() for p in model.parameters()]
        try:
            step(name, optimizer, lambda: torch.nn.functional.mse_loss(model(x), y),
                 lambda: torch.nn.functional.mse_loss(model(val_x), val_y))
        except ValueError as error:
            unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            return {"step": number, "error": str(error), "unchanged": unchanged}
    return {"step": None}


def work(rank: int, shared: str) -> dict:
    finals = {}
    for name in REFUSED:  # first: the recipes below then show that DDP still works
        model, batches = model_and_batches()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        finals[f"refused {name}"] = refused(name, ddp, batches, rank)
    for name in NAMES:
        model, batches = model_and_batches()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        finals[name] = train(name, ddp, batches, rank)
    return finals


@pytest.fixture(scope="module")
def ddp_results():
    return on_every_rank(work)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_ranks_agree_and_match_one_process_on_the_global_batch(name, ddp_results):
    first, second = (results[name] for results in ddp_results)
    assert torch.equal(first, second), f"{name}: the ranks' parameters differ"
    if name in ROUND_OFF_SENSITIVE:
        return
    model, batches = model_and_batches()
    single = train(name, model, batches)
    torch.testing.assert_close(first, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_curvature_and_validation_steps_refuse_ddp_before_moving(name, ddp_results):
    number, message = REFUSED[name]
    for results in ddp_results:
        result = results[f"refused {name}"]
        assert result["step"] == number, result
        assert message in result["error"] and "without DDP" in result["error"]
        assert result["unchanged"]
