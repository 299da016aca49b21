"""torch.distributed.checkpoint (DCP) with every named optimizer, two gloo processes: saved at
step 2 and loaded into a fresh model and optimizer, a run continues bit for bit as the
uninterrupted one, under DistributedDataParallel and FSDP2 (DTensor state, saved shard by
shard), through torch's get_state_dict / set_state_dict and through dcp.save / dcp.load of
``optimizer.state_dict()``."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from processes import WORLD, on_every_rank
from recipes import ALL, NEEDS_MORE_THAN_GRADS, make, step

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]

STEPS = 4
SAVE_AT = 2
#: Recipes that refuse FSDP2's sharded parameters (tests/optimizers/test_fsdp.py).
WHOLE = {name for name in ALL if "soap" in name} | {"sm3", *NEEDS_MORE_THAN_GRADS}
#: How each recipe is distributed: DDP, FSDP2, or (ESGD, RTHO, MARTHE, which refuse both) a
#: model replicated on every process without a wrapper, each seeing the same data.
RUNS = [*(("ddp", name) for name in ALL if name not in NEEDS_MORE_THAN_GRADS),
        *(("replicated", name) for name in sorted(NEEDS_MORE_THAN_GRADS)),
        *(("fsdp", name) for name in ALL if name not in WHOLE)]
#: ``optimizer.state_dict()`` of a fresh torch.optim base lacks its lazily made state, so a
#: template for dcp.load has nothing to load it into: torch's own optimizers need
#: get_optimizer_state_dict, which creates it.
TORCH_BASE = {"mechanize:sgd"}
CASES = [(kind, flow, name) for kind, name in RUNS for flow in ("get_state_dict", "state_dict")
         if flow == "get_state_dict" or name not in TORCH_BASE]


def model_and_optimizer(kind: str, name: str, seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    net = model
    if kind == "fsdp":
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    elif kind == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    return model, net, make(name, model.parameters())


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's half of every global batch (the whole batch on every rank for a replicated
    model, which has no gradient averaging)."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen))
            for _ in range(STEPS + 1)]
    return [(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]) for x, y in data] if rank >= 0 \
        else data


def train(name: str, optimizer, net, data) -> None:
    val_x, val_y = data[-1]
    for x, y in data[:-1]:
        step(name, optimizer, lambda: torch.nn.functional.mse_loss(net(x), y),
             lambda: torch.nn.functional.mse_loss(net(val_x), val_y))


def full(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def save_and_resume(kind: str, flow: str, name: str, data, checkpoint: str) -> torch.Tensor:
    """Train to SAVE_AT, save, load into a fresh (differently seeded) model and optimizer,
    train the rest; the final parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, net, optimizer = model_and_optimizer(kind, name, seed=0)
    train(name, optimizer, net, data[:SAVE_AT] + data[-1:])
    if flow == "get_state_dict":
        model_state, optimizer_state = get_state_dict(model, optimizer)
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint)

    model, net, optimizer = model_and_optimizer(kind, name, seed=5)
    if flow == "get_state_dict":
        model_state, optimizer_state = get_state_dict(model, optimizer)
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    loaded = {"model": model_state, "optim": optimizer_state}
    dcp.load(loaded, checkpoint_id=checkpoint)
    if flow == "get_state_dict":
        set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optim"])
    else:
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optim"])
    train(name, optimizer, net, data[SAVE_AT:])
    return full(model)


def work(rank: int, shared: str) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    uninterrupted: dict[tuple[str, str], torch.Tensor] = {}
    for kind, flow, name in CASES:
        data = batches(-1 if kind == "replicated" else rank)
        if (kind, name) not in uninterrupted:
            model, net, optimizer = model_and_optimizer(kind, name, seed=0)
            train(name, optimizer, net, data)
            uninterrupted[kind, name] = out[f"{kind} {name}"] = full(model)
        checkpoint = os.path.join(shared, f"{kind}-{flow}-{name}".replace(":", "-"))
        out[f"{kind} {flow} {name}"] = save_and_resume(kind, flow, name, data, checkpoint)
    return out


@pytest.fixture(scope="module")
def dcp_results():
    return on_every_rank(work)


@pytest.mark.parametrize("kind, flow, name", CASES)
def test_resumed_run_continues_bit_for_bit(kind, flow, name, dcp_results):
    for results in dcp_results:
        uninterrupted, resumed = results[f"{kind} {name}"], results[f"{kind} {flow} {name}"]
        assert torch.equal(resumed, uninterrupted), \
            f"max difference {(resumed - uninterrupted).abs().max():.3g}"


@pytest.mark.parametrize("name", ALL)
def test_a_fresh_optimizers_checkpoint_template_steps_nothing(name):
    """torch creates lazily made optimizer state with a zero-gradient, zero-lr step when the
    optimizer's ``state`` is empty; ours has an entry per parameter from the start and a
    ``state_dict()`` holding the initial state: nothing moves, nothing counts as a step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    before = full(model)
    optimizer = make(name, model.parameters())
    saved = get_optimizer_state_dict(model, optimizer)
    assert torch.equal(full(model), before)
    assert all(p.grad is None for p in model.parameters())
    if name not in TORCH_BASE:
        assert set(saved["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert all(entry["step"] == 0 for entry in saved["state"].values())
