"""Hypergradient learning rates against tuned schedules on the embedded task.

The embedded character-level language-model task (``gradchain.tasks.charlm``), every run from
the same initial weights on the same batches, SGD with momentum 0.9 as the dynamics:

- baselines: SGD with a cosine schedule from each peak of ``--cosine-lrs`` to 0 (the best is the
  "tuned cosine"), a step decay (x0.1 at 50% and 75% of the steps) from the tuned cosine's peak,
  Adam with a cosine schedule from each peak of ``--adam-cosine-lrs`` (HDAdam's baseline), and
  the constant learning rates the learned methods start from (``--init-lr`` with SGD,
  ``--adam-lr`` with Adam): what they would do without learning;
- ``HDSGD`` (momentum 0.9) and ``HDAdam`` from a fixed initial learning rate, each at every
  hyper-learning rate of ``--hd-hyper-lrs`` / ``--hd-adam-hyper-lrs``;
- ``MARTHE`` with a fixed μ (``--mu``) and with automatic μ, and ``RTHO``, each at every
  hyper-learning rate of ``--marthe-hyper-lrs``, learning from the gradient of a validation loss
  on a split held out of the training data (the last 10% of it, never trained on), with one
  Hessian-vector product per step.

Every learned method starts from ``--init-lr`` (SGD dynamics) or ``--adam-lr`` (HDAdam), a
deliberately untuned constant. Reported: the final validation loss of every run, the learned
learning rate at the end, and each method's best run against its tuned baseline (Adam cosine for
HDAdam, SGD cosine for the others); ``--plot`` saves the validation loss of the best run of each method and
the learning rate every method used at every step (learned or scheduled).

    python benchmarks/hypergrad.py --plot hypergrad.png      # 400 steps per run
    python benchmarks/hypergrad.py --small                   # smoke test
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradchain.optimizers import SGD, Adam
from gradchain.optimizers.hypergrad import HDSGD, MARTHE, RTHO, HDAdam
from gradchain.schedules import cosine_decay_schedule, piecewise_constant_schedule
from gradchain.tasks.charlm import TaskConfig, TrainResult, train


@dataclass
class Run:
    """One training run: its method, label, result and the learning rate of every step."""

    method: str
    label: str
    result: TrainResult
    lrs: list[float] = field(default_factory=list)


def train_recording_lr(make: Callable, config: TaskConfig, lr_of: Callable) -> tuple[
        TrainResult, list[float]]:
    """Train with ``make(params)``; record ``lr_of(optimizer)`` after every step."""
    lrs: list[float] = []

    def factory(params):
        optimizer = make(params)
        optimizer.register_step_post_hook(lambda opt, *_: lrs.append(lr_of(opt)))
        return optimizer

    return train(factory, config), lrs


def learned(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["learned_lr"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--init-lr", type=float, default=0.02)
    parser.add_argument("--adam-lr", type=float, default=3e-4)
    parser.add_argument("--cosine-lrs", type=float, nargs="+", default=[0.02, 0.035, 0.05])
    parser.add_argument("--adam-cosine-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--hd-hyper-lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--hd-adam-hyper-lrs", type=float, nargs="+", default=[3e-8, 1e-7, 3e-7])
    parser.add_argument("--marthe-hyper-lrs", type=float, nargs="+", default=[1e-6, 1e-5])
    parser.add_argument("--mu", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", metavar="PATH")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for smoke tests")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TaskConfig.small() if args.small else TaskConfig(steps=args.steps,
                                                              eval_every=max(args.steps // 8, 1))
    steps = config.steps
    print(f"task: {steps} steps, d_model {config.d_model}, {config.n_layers} layers, "
          f"{args.threads} threads")
    runs: list[Run] = []

    def record(method: str, label: str, make: Callable, lr_of: Callable) -> None:
        result, lrs = train_recording_lr(make, config, lr_of)
        runs.append(Run(method, label, result, lrs))
        print(f"  {method:<18} {label:<22} val {result.final_val_loss:7.3f}  lr at the end "
              f"{lrs[-1]:.4g}  {result.ms_per_step:6.1f} ms/step", flush=True)

    for peak in args.cosine_lrs:  # gradchain's SGD takes a schedule as its lr
        cosine = cosine_decay_schedule(peak, steps)
        record("cosine", f"peak {peak:g}", lambda p, s=cosine: SGD(p, lr=s, momentum=0.9),
               _lr_trace(cosine))
    peak = float(min((r for r in runs if r.method == "cosine"),
                     key=lambda r: _finite(r.result.final_val_loss)).label.split()[-1])
    stairs = piecewise_constant_schedule(peak, {steps // 2: 0.1, 3 * steps // 4: 0.1})
    record("step decay", f"from {peak:g}", lambda p: SGD(p, lr=stairs, momentum=0.9),
           _lr_trace(stairs))
    for peak in args.adam_cosine_lrs:
        cosine = cosine_decay_schedule(peak, steps)
        record("Adam cosine", f"peak {peak:g}", lambda p, s=cosine: Adam(p, lr=s),
               _lr_trace(cosine))
    record("constant", f"SGD {args.init_lr:g}",
           lambda p: SGD(p, lr=args.init_lr, momentum=0.9), lambda _: args.init_lr)
    record("Adam constant", f"Adam {args.adam_lr:g}", lambda p: Adam(p, lr=args.adam_lr),
           lambda _: args.adam_lr)
    for beta in args.hd_hyper_lrs:
        record("HD-SGD", f"hyper-lr {beta:g}",
               lambda p, b=beta: HDSGD(p, lr=args.init_lr, momentum=0.9, hypergrad_lr=b),
               learned)
    for beta in args.hd_adam_hyper_lrs:
        record("HD-Adam", f"hyper-lr {beta:g}",
               lambda p, b=beta: HDAdam(p, lr=args.adam_lr, hypergrad_lr=b), learned)
    for beta in args.marthe_hyper_lrs:
        record(f"MARTHE mu={args.mu:g}", f"hyper-lr {beta:g}",
               lambda p, b=beta: MARTHE(p, lr=args.init_lr, hyper_lr=b, mu=args.mu, alpha=0.0),
               learned)
        record("MARTHE auto mu", f"hyper-lr {beta:g}",
               lambda p, b=beta: MARTHE(p, lr=args.init_lr, hyper_lr=b, mu="auto", alpha=0.0),
               learned)
        record("RTHO", f"hyper-lr {beta:g}",
               lambda p, b=beta: RTHO(p, lr=args.init_lr, hyper_lr=b), learned)

    best = {}
    for run in runs:
        if run.method not in best or _finite(run.result.final_val_loss) < _finite(
                best[run.method].result.final_val_loss):
            best[run.method] = run
    print("\nbest run of each method (final validation loss), against its tuned baseline:")
    for method, run in best.items():
        baseline = best["Adam cosine" if "Adam" in method else "cosine"]
        gap = run.result.final_val_loss - baseline.result.final_val_loss
        print(f"  {method:<18} {run.label:<22} {run.result.final_val_loss:7.3f}  "
              f"({gap:+.3f} against {baseline.method}, {baseline.label})")
    if args.plot:
        plot(best, args.plot)
        print(f"plot written to {args.plot}")


def _lr_trace(schedule: Callable[[int], float]) -> Callable:
    """The learning rate the k-th step used, for a scheduled SGD (k counted by the trace)."""
    count = [0]

    def lr_of(_: torch.optim.Optimizer) -> float:
        count[0] += 1
        return schedule(count[0] - 1)

    return lr_of


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def plot(best: dict[str, Run], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2), layout="constrained")
    losses, rates = figure.subplots(1, 2)
    for index, (method, run) in enumerate(best.items()):
        color = f"C{index}"
        losses.plot(run.result.val_steps, run.result.val_loss, "o-", color=color, ms=3,
                    label=f"{method} ({run.label})")
        rates.plot(range(1, len(run.lrs) + 1), run.lrs, color=color, label=method)
    losses.set(xlabel="step", ylabel="validation loss", title="validation loss, best run each",
               ylim=(None, min(max(r.result.val_loss[1] for r in best.values()), 4.0)))
    rates.set(xlabel="step", ylabel="learning rate", yscale="log",
              title="learning rate in use (learned or scheduled)")
    losses.legend(fontsize=7)
    rates.legend(fontsize=7)
    for axes in (losses, rates):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
