"""Optimizer step time and state memory: gradchain against torch.optim, interleaved in one run.

The parameters are those of a GPT-like model (vocab 8192, d_model 512, 6 layers, ~27M
parameters) with fixed random gradients. Every candidate owns a copy of the parameters; the
candidates take turns, one step each, for ``--repeats`` rounds, so drifts of the machine hit them
all alike. Reported: the median step time, its ratio to torch's foreach and fused AdamW, and the
optimizer state bytes.

    python benchmarks/step_time.py                 # AdamW, eager and compiled, 2 threads
    python benchmarks/step_time.py --no-compile --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gradchain.optimizers import AdamW


def gpt_parameters(vocab: int = 8192, d_model: int = 512, layers: int = 6) -> list[nn.Parameter]:
    """The parameters of a GPT-like decoder, in model order."""
    def block() -> nn.Module:
        return nn.ModuleDict({
            "ln1": nn.LayerNorm(d_model), "qkv": nn.Linear(d_model, 3 * d_model),
            "proj": nn.Linear(d_model, d_model), "ln2": nn.LayerNorm(d_model),
            "up": nn.Linear(d_model, 4 * d_model), "down": nn.Linear(4 * d_model, d_model),
        })

    model = nn.ModuleDict({
        "embed": nn.Embedding(vocab, d_model), "blocks": nn.ModuleList(block() for _ in
                                                                     range(layers)),
        "ln_f": nn.LayerNorm(d_model), "head": nn.Linear(d_model, vocab, bias=False),
    })
    return list(model.parameters())


def gpt_parameters_with_gradients(threads: int) -> list[nn.Parameter]:
    """``gpt_parameters()`` with fixed random gradients, torch set to ``threads`` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    template = gpt_parameters()
    for p in template:
        p.grad = torch.randn_like(p) * 1e-2
    return template


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages in the optimizer's state."""
    seen, total = set(), 0
    for entry in optimizer.state_dict()["state"].values():
        for value in entry.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                key = value.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


def interleaved_medians(optimizers: dict[str, torch.optim.Optimizer], repeats: int
                        ) -> dict[str, float]:
    """Median seconds of ``step()`` per optimizer, the optimizers taking turns, one step each,
    for ``repeats`` rounds (drifts of the machine hit them all alike)."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_candidates(template: list[nn.Parameter], compile: bool
                    ) -> dict[str, torch.optim.Optimizer]:
    hyper = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}

    def fresh() -> list[nn.Parameter]:
        params = [nn.Parameter(p.detach().clone()) for p in template]
        for p, t in zip(params, template):
            p.grad = t.grad.clone()
        return params

    candidates: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "torch AdamW for-loop": lambda: torch.optim.AdamW(fresh(), foreach=False, **hyper),
        "torch AdamW foreach": lambda: torch.optim.AdamW(fresh(), foreach=True, **hyper),
        "torch AdamW fused": lambda: torch.optim.AdamW(fresh(), fused=True, **hyper),
        "gradchain AdamW eager": lambda: AdamW(fresh(), **hyper),
    }
    if compile:
        candidates["gradchain AdamW compiled"] = lambda: AdamW(fresh(), compile=True, **hyper)
    return {name: make() for name, make in candidates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    template = gpt_parameters_with_gradients(args.threads)
    count = sum(p.numel() for p in template)
    print(f"{count / 1e6:.1f}M parameters in {len(template)} tensors, {args.threads} threads, "
          f"torch {torch.__version__}")

    optimizers = make_candidates(template, compile=not args.no_compile)
    for name, optimizer in optimizers.items():  # warm-up (and compilation)
        start = time.perf_counter()
        optimizer.step()
        optimizer.step()
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s")
    median = interleaved_medians(optimizers, args.repeats)
    foreach, fused = median["torch AdamW foreach"], median["torch AdamW fused"]
    print("\n| optimizer | median step (ms) | vs torch foreach | vs torch fused | state |")
    print("|---|---:|---:|---:|---:|")
    for name, optimizer in optimizers.items():
        print(f"| {name} | {median[name] * 1e3:.1f} | {median[name] / foreach:.2f}x | "
              f"{median[name] / fused:.2f}x | {state_bytes(optimizer) / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
