"""Amortized step time of ESGD-M against AdamW on the embedded language-model task.

ESGD-M computes a Hessian-vector product (a double backward) on every step of its curvature
warm-up and then every ``update_d_every`` steps; a step there costs a forward, a backward with
the graph kept, and the product. This measures whole training steps (forward, backward,
optimizer) of the two optimizers interleaved, one step each in turn, over a window after the
warm-up that holds a whole number of HVP periods, and reports the mean per step and the ratio.

    python benchmarks/esgd.py --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time
import torch

from gradchain.optimizers import ESGD, AdamW
from gradchain.tasks.charlm import (TaskConfig, closure_step, default_step, make_model,
                                    train_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="measured steps after warm-up")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TaskConfig()
    warmup = 20  # ESGD's d_warmup: every step probes
    window = args.steps - args.steps % 10  # whole HVP periods
    batches = train_batches(config, warmup + window)

    runs = {}
    for name, make, step in (("AdamW", lambda p: AdamW(p, lr=1e-3), default_step),
                             ("ESGD", lambda p: ESGD(p, lr=0.5), closure_step)):
        model = make_model(config)
        runs[name] = (model, make(model.parameters()), step, [])
    for i, batch in enumerate(batches):
        for model, optimizer, step, times in runs.values():
            start = time.perf_counter()
            step(model, batch, optimizer)
            if i >= warmup:
                times.append(time.perf_counter() - start)

    print(f"char-LM task (d_model {config.d_model}, {config.n_layers} layers, batch "
          f"{config.batch_size}x{config.seq_len}), {args.threads} threads, {window} steps after "
          f"ESGD's {warmup}-step curvature warm-up")
    adamw = statistics.fmean(runs["AdamW"][3])
    print("| optimizer | mean step (ms) | median step (ms) | vs AdamW |")
    print("|---|---:|---:|---:|")
    for name, (_, _, _, times) in runs.items():
        mean = statistics.fmean(times)
        print(f"| {name} | {mean * 1e3:.1f} | {statistics.median(times) * 1e3:.1f} | "
              f"{mean / adamw:.2f}x |")


if __name__ == "__main__":
    main()
