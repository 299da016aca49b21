"""Mechanic: learning-rate robustness on the embedded task, and the overhead of ``mechanize``.

``sweep``
    The embedded character-level language-model task (``gradchain.tasks.charlm``): AdamW
    (``gradchain.optimizers.AdamW``, weight decay 0.01) and ``gradchain.mechanize(AdamW)`` at
    every base learning rate of ``--lrs`` (default one per decade, 1e-5 ... 1e1), each a whole
    training run from the same initial weights on the same batches. Reported: the final
    validation loss of every run, the best-tuned AdamW, and for every window of consecutive
    decades the worst mechanized run's distance from that best AdamW (relative, in %), so the
    widest window within ``--tolerance`` (10%) is the learning-rate range over which Mechanic
    needs no tuning. ``--plot`` saves final loss against base learning rate, and the learned
    scale S of every mechanized run against steps.

    ``--schedule`` gives both optimizers the same learning-rate multiplier (the Mechanic
    paper's setting: the base keeps its schedule, Mechanic learns the scale on top of it):
    ``constant`` (the default) or ``cosine`` (half a cosine from 1 to 0 at the last step),
    after ``--warmup`` steps of linear warm-up (default 0). ``--s-decay`` is Mechanic's λ
    (default 0.01, the optax and mechanic-pytorch default); ``--weight-decay`` is AdamW's,
    for both.

``overhead``
    The parameters and fixed random gradients of ``step_time.py`` (a GPT-like model, ~27M
    parameters). Candidates, interleaved one step each for ``--repeats`` rounds: torch's AdamW
    (foreach) and SGD, each alone, under ``gradchain.mechanize`` and under the published
    ``mechanic_pytorch.mechanize``; gradchain's ``AdamW`` alone and under ``gradchain.mechanize``.
    Reported: the median step time and its ratio to the base optimizer's, and the persistent
    state of the mechanized optimizer beyond its base's, in parameter-sized buffers (the
    parameters hold 27.3M float32 values, 104 MiB).

    python benchmarks/mechanic.py sweep --plot mechanic_sweep.png     # 14 runs, 400 steps each
    python benchmarks/mechanic.py overhead --repeats 30
    python benchmarks/mechanic.py sweep --warmup 100                 # warm-up, then constant
    python benchmarks/mechanic.py sweep --steps 1000 --schedule cosine --warmup 100  # as the paper
    python benchmarks/mechanic.py sweep --small                      # smoke tests
    python benchmarks/mechanic.py overhead --small --repeats 3
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import gpt_parameters_with_gradients, interleaved_medians  # noqa: E402

from gradchain import mechanize  # noqa: E402
from gradchain.optimizers import AdamW  # noqa: E402
from gradchain.tasks.charlm import TaskConfig, state_bytes, train  # noqa: E402

DECADES = [10.0 ** e for e in range(-5, 2)]


# -------------------------------------------------------------------------------------- sweep


def sweep(args: argparse.Namespace) -> None:
    config = TaskConfig.small() if args.small else TaskConfig(steps=args.steps,
                                                              eval_every=args.steps // 8)
    multiplier = schedule(args.schedule, args.warmup, config.steps)
    print(f"task: {config.steps} steps, d_model {config.d_model}, {config.n_layers} layers; "
          f"AdamW weight decay {args.weight_decay}; {args.schedule} schedule, "
          f"{args.warmup} warm-up steps; Mechanic s_decay {args.s_decay}")
    finals: dict[str, dict[float, float]] = {"AdamW": {}, "mechanize(AdamW)": {}}
    scales: dict[float, list[float]] = {}
    for lr in args.lrs:
        finals["AdamW"][lr] = train(
            lambda params: scheduled(AdamW(params, lr=lr, weight_decay=args.weight_decay),
                                     multiplier), config
        ).final_val_loss
        trace: list[float] = []

        def mechanized(params, lr=lr, trace=trace):
            optimizer = mechanize(AdamW, s_decay=args.s_decay)(
                params, lr=lr, weight_decay=args.weight_decay)
            optimizer.register_step_post_hook(lambda opt, *_: trace.append(opt.scale))
            return scheduled(optimizer, multiplier)

        finals["mechanize(AdamW)"][lr] = train(mechanized, config).final_val_loss
        scales[lr] = trace
        print(f"  lr {lr:7.0e}  AdamW {finals['AdamW'][lr]:7.3f}   mechanize(AdamW) "
              f"{finals['mechanize(AdamW)'][lr]:7.3f}  (final scale S = {trace[-1]:.3g})",
              flush=True)
    report(finals, args.tolerance)
    if args.plot:
        plot_sweep(finals, scales, args.plot)
        print(f"plot written to {args.plot}")


def schedule(name: str, warmup: int, steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of the step after ``t`` steps: linear warm-up from
    ``1/warmup`` to 1 over ``warmup`` steps, then 1 (``constant``) or half a cosine from 1 to 0
    at the last step (``cosine``).

    Example:
        >>> f = schedule("cosine", 2, 6)
        >>> [round(f(t), 2) for t in range(6)]
        [0.5, 1.0, 1.0, 0.85, 0.5, 0.15]
    """
    def multiplier(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if name == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(steps - warmup, 1)))

    return multiplier


def scheduled(optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]
              ) -> torch.optim.Optimizer:
    """``optimizer``, its learning rates multiplied by ``multiplier(steps taken)`` (a
    ``LambdaLR`` advanced by a step hook, as ``train`` only calls ``optimizer.step``); a
    mechanized optimizer's base learning rate is scheduled and its learned S applies on top."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    optimizer.register_step_post_hook(lambda *_: scheduler.step())
    return optimizer


def report(finals: dict[str, dict[float, float]], tolerance: float) -> None:
    adamw, mech = finals["AdamW"], finals["mechanize(AdamW)"]
    best_lr = min(adamw, key=lambda lr: _finite_or_inf(adamw[lr]))
    best = adamw[best_lr]
    print(f"best-tuned AdamW: lr {best_lr:.0e}, final validation loss {best:.3f}")
    lrs = sorted(mech)
    widest: tuple[int, float, float] = (0, math.nan, math.nan)
    for width in range(1, len(lrs) + 1):
        for start in range(len(lrs) - width + 1):
            window = lrs[start:start + width]
            worst = max(_finite_or_inf(mech[lr]) for lr in window)
            gap = (worst - best) / best
            if gap <= tolerance and width > widest[0]:
                widest = (width, window[0], window[-1])
    worst_all = max(_finite_or_inf(mech[lr]) for lr in lrs)
    print(f"worst mechanized run over all {len(lrs)} base learning rates: "
          f"{100 * (worst_all - best) / best:+.1f}% from the best AdamW")
    if widest[0]:
        print(f"widest range within {100 * tolerance:.0f}% of the best AdamW: base lr "
              f"{widest[1]:.0e} ... {widest[2]:.0e} ({widest[0]} learning rates)")
    else:
        print(f"no mechanized run is within {100 * tolerance:.0f}% of the best AdamW")


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def plot_sweep(finals: dict[str, dict[float, float]], scales: dict[float, list[float]],
               path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2), layout="constrained")
    by_lr, by_step = figure.subplots(1, 2)
    for name, values in finals.items():
        lrs = sorted(values)
        by_lr.plot(lrs, [values[lr] for lr in lrs], "o-", label=name)
    finite = [v for values in finals.values() for v in values.values() if math.isfinite(v)]
    by_lr.set(xscale="log", xlabel="base learning rate", ylabel="final validation loss",
              title="final validation loss against the base learning rate",
              ylim=(0.95 * min(finite), min(max(finite), 2 * min(finite))))
    by_lr.legend()
    for lr, trace in scales.items():
        by_step.plot(range(1, len(trace) + 1), trace, label=f"base lr {lr:.0e}")
        by_step.plot(range(1, len(trace) + 1), [lr * s for s in trace], ":", color="grey",
                     lw=0.6)
    by_step.set(yscale="log", xlabel="step", ylabel="learned scale S",
                title="Mechanic's scale S (dotted: S x base lr, the effective step size)")
    by_step.legend(fontsize=7)
    for axes in (by_lr, by_step):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------- overhead


def overhead(args: argparse.Namespace) -> None:
    import mechanic_pytorch

    template = gpt_parameters_with_gradients(args.threads)
    if args.small:
        template = template[:4]
    numel = sum(p.numel() for p in template)
    print(f"{numel / 1e6:.1f}M parameters in {len(template)} tensors, {args.threads} threads, "
          f"torch {torch.__version__}; {args.repeats} interleaved steps")

    def copies() -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(p.detach().clone()) for p in template]
        for p, t in zip(params, template):
            p.grad = t.grad.clone()
        return params

    adamw = dict(lr=1e-3, weight_decay=0.01)
    sgd = dict(lr=1e-2, momentum=0.9)
    candidates = {  # name -> (optimizer, base name)
        "torch AdamW": (torch.optim.AdamW(copies(), **adamw, foreach=True), None),
        "gradchain.mechanize(torch AdamW)":
            (mechanize(torch.optim.AdamW)(copies(), **adamw, foreach=True), "torch AdamW"),
        "mechanic_pytorch(torch AdamW)":
            (mechanic_pytorch.mechanize(torch.optim.AdamW)(copies(), **adamw, foreach=True),
             "torch AdamW"),
        "torch SGD": (torch.optim.SGD(copies(), **sgd, foreach=True), None),
        "gradchain.mechanize(torch SGD)":
            (mechanize(torch.optim.SGD)(copies(), **sgd, foreach=True), "torch SGD"),
        "mechanic_pytorch(torch SGD)":
            (mechanic_pytorch.mechanize(torch.optim.SGD)(copies(), **sgd, foreach=True),
             "torch SGD"),
        "gradchain AdamW": (AdamW(copies(), **adamw), None),
        "gradchain.mechanize(gradchain AdamW)": (mechanize(AdamW)(copies(), **adamw),
                                                 "gradchain AdamW"),
    }
    optimizers = {name: optimizer for name, (optimizer, _) in candidates.items()}
    for optimizer in optimizers.values():  # state allocation is not part of a step
        optimizer.step()
    medians = interleaved_medians(optimizers, args.repeats)
    param_bytes = 4 * numel
    rows = []
    for name, (optimizer, base) in candidates.items():
        ratio = f"{medians[name] / medians[base]:.2f}x" if base else "1.00x (base)"
        extra = ""
        if base:
            extra = (state_bytes(optimizer) - state_bytes(candidates[base][0])) / param_bytes
            extra = f"{extra:+.2f}"
        rows.append((name, f"{1e3 * medians[name]:.1f}", ratio, extra))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"{'optimizer':<{widths[0]}}  ms/step  vs base  extra state (param-sized buffers)")
    for name, ms, ratio, extra in rows:
        print(f"{name:<{widths[0]}}  {ms:>7}  {ratio:>7}  {extra:>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True)
    runs = commands.add_parser("sweep", help="AdamW and mechanized AdamW over learning rates")
    runs.add_argument("--lrs", type=float, nargs="+", default=DECADES)
    runs.add_argument("--steps", type=int, default=400)
    runs.add_argument("--weight-decay", type=float, default=0.01)
    runs.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    runs.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    runs.add_argument("--s-decay", type=float, default=0.01, help="Mechanic's λ")
    runs.add_argument("--tolerance", type=float, default=0.10)
    runs.add_argument("--plot", metavar="PATH")
    runs.add_argument("--small", action="store_true", help="tiny sizes, for smoke tests")
    runs.set_defaults(command=sweep)
    steps = commands.add_parser("overhead", help="step time and memory against the base")
    steps.add_argument("--repeats", type=int, default=30)
    steps.add_argument("--threads", type=int, default=2)
    steps.add_argument("--small", action="store_true", help="tiny sizes, for smoke tests")
    steps.set_defaults(command=overhead)
    args = parser.parse_args()
    torch.set_num_threads(getattr(args, "threads", 2))
    args.command(args)


if __name__ == "__main__":
    main()
