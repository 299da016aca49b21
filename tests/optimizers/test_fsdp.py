"""FSDP2 (``fully_shard``, DTensor parameters) on the gloo backend, two processes on this
machine. Element-wise recipes, the hypergradient ones of the training loss (HD) and Mechanic
end with the parameters of one process that sees the whole global batch; the reductions they
need (dot products, norms) span every shard. Recipes that need whole matrices or the
gradient's graph refuse sharded parameters at their first step, before anything moves."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from processes import WORLD, on_every_rank
from recipes import ALL, make, step

from gradchain import chains, mechanize
from gradchain.chains import chain
from gradchain.optimizers import ChainOptimizer
from gradchain.transforms import (
    clip_by_agc,
    clip_by_global_norm,
    scale_by_adam,
    scale_by_laprop,
    scale_by_learning_rate,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]

STEPS = 4
#: What each refusing recipe's error names as the reason.
REFUSED = {**{name: "whole matrices" for name in ALL if "soap" in name},
           "sm3": "covers are maxima", "esgd": "Hessian-vector products",
           "rtho": "Hessian-vector products", "marthe": "Hessian-vector products"}
SHARDED = [name for name in ALL if name not in REFUSED]


def model_and_batches():
    """Shards of uneven sizes: 7 rows as 4 + 3, 3 as 2 + 1, and 1 as 1 + 0 (an empty shard)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
                                torch.nn.Tanh(), torch.nn.Linear(3, 1))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen))
               for _ in range(STEPS)]
    return model, batches


def shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)


def full(model: torch.nn.Module) -> torch.Tensor:
    """The parameters, gathered whole on every process (DTensor.full_tensor)."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def train(name: str, optimizer, model, batches, rank: int | None = None) -> None:
    for x, y in batches:
        if rank is not None:  # this rank's half of the global batch
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        step(name, optimizer, lambda: torch.nn.functional.mse_loss(model(x), y))


def learned(name: str, optimizer) -> float | None:
    """What a global reduction drives: HD's learning rate, Mechanic's scale."""
    if name.startswith("hd-"):
        return optimizer.param_groups[0]["learned_lr"]
    if name.startswith("mechanize"):
        return optimizer.scale
    return None


#: Chains that are not element-wise (the optimizer hands them DTensors): clipping by the global
#: norm and adaptively per parameter, with thresholds that clip on every step, and Mechanic as
#: a chain around AdamW.
COMPOSED = {
    "clip_by_global_norm+adam": lambda: chain(clip_by_global_norm(0.05), scale_by_adam(),
                                              scale_by_learning_rate(1e-2)),
    "clip_by_agc+laprop": lambda: chain(clip_by_agc(0.01), scale_by_laprop(),
                                        scale_by_learning_rate(1e-2)),
    "mechanize(adamw)": lambda: mechanize(chains.adamw)(learning_rate=1.0),
}


def composed(name: str, params) -> ChainOptimizer:
    return ChainOptimizer(params, COMPOSED[name]())


def work(rank: int, shared: str) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict[str, dict] = {}
    for name in ALL:
        model, batches = model_and_batches()
        shard(model)
        optimizer = make(name, model.parameters())
        before = full(model)
        try:
            train(name, optimizer, model, batches, rank)
        except ValueError as error:
            out[name] = {"error": str(error), "unchanged": torch.equal(before, full(model))}
            continue
        out[name] = {"params": full(model), "learned": learned(name, optimizer)}
    for name in COMPOSED:
        model, batches = model_and_batches()
        shard(model)
        train(name, composed(name, model.parameters()), model, batches, rank)
        out[name] = {"params": full(model)}
    model, batches = model_and_batches()
    shard(model)
    optimizer = make("sfadamw", model.parameters())
    train("sfadamw", optimizer, model, batches, rank)
    training = full(model)
    optimizer.eval()
    average = full(model)
    optimizer.train()
    out["sfadamw eval"] = {"eval": average, "train": full(model), "training": training}
    first = next(iter(model.parameters()))
    entry = optimizer.state_dict()["state"][0]
    out["state layout"] = {key: str(value.placements) if hasattr(value, "placements")
                           else value for key, value in entry.items()
                           if torch.is_tensor(value)}
    out["param layout"] = {"placements": str(first.placements)}
    model, _ = model_and_batches()
    shard(model)
    optimizer = make("adamw", model.parameters())
    weight = next(iter(model.parameters()))
    weight.grad = torch.zeros(weight.shape)  # whole, where the optimizer needs its shard
    try:
        optimizer.step()
        out["plain gradient"] = {"error": ""}
    except ValueError as error:
        out["plain gradient"] = {"error": str(error)}
    return out


@pytest.fixture(scope="module")
def fsdp_results():
    return on_every_rank(work)


def one_process(name: str, build=make):
    model, batches = model_and_batches()
    optimizer = build(name, model.parameters())
    train(name, optimizer, model, batches)
    return full(model), optimizer


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_recipes_match_one_process_on_the_global_batch(name, fsdp_results):
    first, second = (results[name] for results in fsdp_results)
    assert "error" not in first, first.get("error")
    assert torch.equal(first["params"], second["params"])
    params, optimizer = one_process(name)
    torch.testing.assert_close(first["params"], params, rtol=1e-5, atol=1e-7)
    model, _ = model_and_batches()
    assert not torch.equal(params, full(model)), "the parameters did not move"
    expected = learned(name, optimizer)
    if expected is not None:  # the global dot products and norms span both shards
        assert first["learned"] == pytest.approx(expected, rel=1e-5)
        assert second["learned"] == first["learned"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_recipes_that_need_whole_parameters_refuse_shards_before_moving(name, fsdp_results):
    for results in fsdp_results:
        result = results[name]
        assert "params" not in result, f"{name} ran on sharded parameters"
        assert "does not run on DTensor parameters (FSDP2's fully_shard" in result["error"]
        assert REFUSED[name] in result["error"] and "Instead, " in result["error"]
        assert result["unchanged"]


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_clipping_and_mechanic_chains_reduce_over_all_shards(name, fsdp_results):
    params, _ = one_process(name, composed)
    model, _ = model_and_batches()
    assert not torch.equal(params, full(model))
    for results in fsdp_results:
        torch.testing.assert_close(results[name]["params"], params, rtol=1e-5, atol=1e-7)


def test_schedule_free_eval_and_train_swap_sharded_parameters(fsdp_results):
    result = fsdp_results[0]["sfadamw eval"]
    model, batches = model_and_batches()
    optimizer = make("sfadamw", model.parameters())
    train("sfadamw", optimizer, model, batches)
    optimizer.eval()
    torch.testing.assert_close(result["eval"], full(model), rtol=1e-5, atol=1e-7)
    assert not torch.equal(result["eval"], result["training"])
    assert torch.equal(result["train"], result["training"])


def test_state_of_sharded_parameters_is_sharded_alike(fsdp_results):
    """Per-parameter state is a DTensor placed as its parameter (what DCP saves shard by
    shard); group-wide scalars are plain tensors, the same on every process."""
    first, second = (results["state layout"] for results in fsdp_results)
    placements = fsdp_results[0]["param layout"]["placements"]
    assert {key: first[key] for key in ("z", "base.rms.nu")} == {"z": placements,
                                                                 "base.rms.nu": placements}
    scalars = [key for key, value in first.items() if torch.is_tensor(value)]
    assert scalars and all(torch.equal(first[key], second[key]) for key in scalars)


def test_a_gradient_not_sharded_as_its_parameter_is_refused(fsdp_results):
    for results in fsdp_results:
        error = results["plain gradient"]["error"]
        assert "is a DTensor with placements" in error and "a plain tensor" in error
