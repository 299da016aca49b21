"""SM3 step time and state memory: gradchain against torch-SM3 and torch's AdamW, interleaved.

The parameters and the fixed random gradients are those of ``step_time.py`` (a GPT-like model,
~27M parameters). Every candidate owns a copy of the parameters; the candidates take turns, one
step each, for ``--repeats`` rounds, so drifts of the machine hit them all alike. Reported: the
median step time, its ratio to torch-SM3 and to torch's foreach AdamW, and the optimizer state
bytes and their ratio to AdamW's. torch-SM3 (``pip install torch-SM3``) is optional.

    python benchmarks/sm3.py                  # momentum 0, eager and compiled, 2 threads
    python benchmarks/sm3.py --momentum 0.9 --no-compile
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from step_time import (gpt_parameters_with_gradients, interleaved_medians,  # noqa: E402
                       state_bytes)

from gradchain.optimizers.sm3 import SM3  # noqa: E402

try:
    from SM3 import SM3 as TorchSM3  # the torch-SM3 package
except ImportError:  # pragma: no cover - optional
    TorchSM3 = None


def make_candidates(template: list[nn.Parameter], momentum: float, compile: bool
                    ) -> dict[str, torch.optim.Optimizer]:
    lr = 1e-3

    def fresh() -> list[nn.Parameter]:
        params = [nn.Parameter(p.detach().clone()) for p in template]
        for p, t in zip(params, template):
            p.grad = t.grad.clone()
        return params

    candidates: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "gradchain SM3 eager": lambda: SM3(fresh(), lr=lr, momentum=momentum),
    }
    if compile:
        candidates["gradchain SM3 compiled"] = lambda: SM3(fresh(), lr=lr, momentum=momentum,
                                                           compile=True)
    if TorchSM3 is not None:
        candidates["torch-SM3"] = lambda: TorchSM3(fresh(), lr=lr, momentum=momentum)
    candidates["torch AdamW foreach"] = lambda: torch.optim.AdamW(fresh(), lr=lr, foreach=True)
    return {name: make() for name, make in candidates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    template = gpt_parameters_with_gradients(args.threads)
    count = sum(p.numel() for p in template)
    print(f"{count / 1e6:.1f}M parameters in {len(template)} tensors, {args.threads} threads, "
          f"momentum {args.momentum}, torch {torch.__version__}")

    optimizers = make_candidates(template, args.momentum, compile=not args.no_compile)
    for name, optimizer in list(optimizers.items()):  # warm-up (and compilation)
        start = time.perf_counter()
        try:
            optimizer.step()
            optimizer.step()
        except Exception as error:  # noqa: BLE001 - a failed compile drops the candidate
            print(f"  {name} failed, left out: {type(error).__name__}: {error}")
            del optimizers[name]
            continue
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s")
    median = interleaved_medians(optimizers, args.repeats)
    adamw = median["torch AdamW foreach"]
    reference = median.get("torch-SM3")
    adamw_bytes = state_bytes(optimizers["torch AdamW foreach"])
    print("\n| optimizer | median step (ms) | vs torch-SM3 | vs AdamW foreach | state | "
          "state vs AdamW |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, optimizer in optimizers.items():
        size = state_bytes(optimizer)
        versus = f"{median[name] / reference:.2f}x" if reference else "n/a"
        print(f"| {name} | {median[name] * 1e3:.1f} | {versus} | {median[name] / adamw:.2f}x | "
              f"{size / 2**20:.2f} MiB | {100 * size / adamw_bytes:.2f}% |")


if __name__ == "__main__":
    main()
