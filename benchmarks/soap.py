"""SOAP: step time against HeavyBall and pytorch-optimizer, and training speed against AdamW.

``step-time``
    The parameters and fixed random gradients of ``step_time.py`` (a GPT-like model, ~27M
    parameters). Candidates: gradchain's ``SOAP`` and ``PrecondSchedulePaLMSOAP``, HeavyBall 0.8.1's
    ``ForeachSOAP`` eager and compiled, and pytorch-optimizer's ``SOAP``, all with lr 3e-3, betas
    (0.9, 0.95), weight decay 0.01, max_precond_dim 2048, merged dimensions, and the eigenbases
    refreshed every 10 updates (``PrecondSchedulePaLMSOAP`` refreshes on its own schedule and uses
    PaLM's β₂, so its β₂ is not 0.95). Every candidate owns a copy of the parameters and gets a
    fresh copy of the same gradients before every step (HeavyBall sets ``p.grad = None``). The first
    call of every SOAP only initialises (an ``eigh`` of every Gram matrix, up to 2048 x 2048;
    HeavyBall's also refreshes), reported as "init"; then the candidates take turns, one step each,
    for ``--repeats`` rounds (a multiple of 10: whole refresh periods), so drifts of the machine hit
    them all alike. Reported per candidate: init, the median time of the steps that do not refresh
    the bases, the amortized time (the mean over all measured steps, refreshes included: a
    ``linalg.qr`` and a power-iteration product per Gram matrix), its ratio to the fastest peer's
    (HeavyBall's or pytorch-optimizer's), how many of the steps refreshed, and the state bytes
    (every tensor of ``state_dict()["state"]`` found by walking nested containers, each storage
    once: HeavyBall keeps its Gram matrices and bases in lists).

    HeavyBall 0.8.1 compiles its ``project``, ``compute_ggt`` and ``get_orthogonal_matrix_QR``
    with ``torch.compile(fullgraph=False, dynamic=True, mode=_mode)`` when the module-level
    ``heavyball.utils._mode`` is set, and ships it as ``None`` (compilation off). The compiled
    candidate swaps in those functions compiled this way (inductor's default mode) around its own
    steps only, so the eager one stays eager; dynamo's recompile limit is raised from 8 to 64 so
    that every variant of ``project`` compiles. ``torch.compile(opt.step)`` on the whole step is
    not used: the step's β debiasing changes a Python float on every step, so dynamo recompiles
    the step's frames until its recompile limit and then runs them eagerly. The compiled
    candidate first compiles on a throwaway instance (init and one refresh period), so its
    measured init and steps exclude compilation. pytorch-optimizer's ``merge_dims=True`` fails on
    1-D parameters (it reshapes a bias of 64 entries to ``[1]``), and merging changes none of
    this model's matrices, so it runs without.

``task``
    The embedded character-level language-model task (``gradchain.tasks.charlm``): gradchain's
    ``SOAP`` (class defaults, refresh every 2 updates) at each of ``--soap-lrs``, AdamW at its
    tuned ``DEFAULT_HYPERPARAMETERS["adamw"]`` (or the best of ``--adamw-lrs``), and
    ``PrecondSchedulePaLMSOAP`` at the best SOAP learning rate, each a whole training run from
    the same initial weights on the same batches. Reported: the sweep (final validation loss per
    learning rate), then for each against the best AdamW run: the first step and the training
    wall time (evaluations excluded) at which its validation loss reaches AdamW's final
    validation loss, as fractions of AdamW's steps and seconds (at the resolution of the
    evaluations, every ``--eval-every`` steps), and its validation loss at AdamW's total time.
    ``--plot`` saves validation loss against steps and seconds (needs matplotlib).

Needs heavyball 0.8.1 and pytorch-optimizer (``pip install -e .[bench]``).

    python benchmarks/soap.py step-time                     # eager and compiled, 2 threads
    python benchmarks/soap.py step-time --no-compile --repeats 40
    python benchmarks/soap.py task --plot soap.png          # 1000 steps per run
    python benchmarks/soap.py step-time --small --repeats 10   # smoke tests
    python benchmarks/soap.py task --small
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import heavyball
import heavyball.utils
import pytorch_optimizer
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from step_time import gpt_parameters  # noqa: E402

from gradchain.optimizers import SOAP, AdamW, PrecondSchedulePaLMSOAP  # noqa: E402
from gradchain.schedules import precond_schedule  # noqa: E402
from gradchain.tasks.charlm import (DEFAULT_HYPERPARAMETERS, TaskConfig,  # noqa: E402
                                    TrainResult, state_bytes, train)
from gradchain.transforms.soap import refresh_due  # noqa: E402

LR = 3e-3
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.01
MAX_PRECOND_DIM = 2048
FREQUENCY = 10  # refresh period of the constant-frequency candidates
SMALL_MODEL = {"vocab": 512, "d_model": 64, "layers": 1}

Frequency = int | Callable[[int], float]
Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


# ----------------------------------------------------------------------------------------------
# Step time


#: HeavyBall's decorated functions, compiled as its decorator does when ``_mode`` is set, and the
#: modules that call them by these names (every SOAP class imports ``project`` into its module).
_HEAVYBALL_COMPILED = {
    name: torch.compile(getattr(heavyball.utils, name), fullgraph=False, dynamic=True)
    for name in ("project", "compute_ggt", "get_orthogonal_matrix_QR")
}
_HEAVYBALL_CALLERS = ((heavyball.utils, "compute_ggt"),
                      (heavyball.utils, "get_orthogonal_matrix_QR"),
                      *((sys.modules[cls.__module__], "project") for cls in (
                          heavyball.ForeachSOAP, heavyball.PaLMForeachSOAP,
                          heavyball.SFPaLMForeachSOAP, heavyball.PrecondScheduleSFPaLMSOAP,
                          heavyball.PrecondSchedulePaLMForeachSOAP,
                          heavyball.PrecondScheduleForeachSOAP)))


@contextlib.contextmanager
def heavyball_compiled() -> Iterator[None]:
    """HeavyBall's compile decorator switched on inside the block only."""
    saved = [getattr(module, name) for module, name in _HEAVYBALL_CALLERS]
    for module, name in _HEAVYBALL_CALLERS:
        setattr(module, name, _HEAVYBALL_COMPILED[name])
    try:
        yield
    finally:
        for (module, name), function in zip(_HEAVYBALL_CALLERS, saved):
            setattr(module, name, function)


def heavyball_compiled_class(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A HeavyBall SOAP class stepping with HeavyBall's compiled functions."""

    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        with heavyball_compiled():
            return cls.step(self, closure)

    return type(f"Compiled{cls.__name__}", (cls,), {"step": step})


@dataclass(frozen=True)
class Contender:
    """How to build a candidate, its refresh frequency, and whether it is a peer (not
    gradchain) or compiled (warmed up on a throwaway instance first)."""

    make: Factory
    frequency: Frequency = FREQUENCY
    peer: bool = True
    compiled: bool = False


def contenders(compile: bool) -> dict[str, Contender]:
    """The step-time candidates at equal settings."""
    soap = {"lr": LR, "weight_decay": WEIGHT_DECAY, "max_precond_dim": MAX_PRECOND_DIM,
            "merge_dims": True}
    heavy = {**soap, "betas": BETAS, "precondition_frequency": FREQUENCY}
    candidates = {
        "gradchain `SOAP`": Contender(lambda p: SOAP(p, **heavy), peer=False),
        "gradchain `PrecondSchedulePaLMSOAP`": Contender(
            lambda p: PrecondSchedulePaLMSOAP(p, beta=BETAS[0], **soap),
            frequency=precond_schedule(), peer=False),
        "heavyball `ForeachSOAP` eager": Contender(lambda p: heavyball.ForeachSOAP(p, **heavy)),
    }
    if compile:
        candidates["heavyball `ForeachSOAP` compiled"] = Contender(
            lambda p: heavyball_compiled_class(heavyball.ForeachSOAP)(p, **heavy), compiled=True)
    candidates["pytorch_optimizer `SOAP`"] = Contender(lambda p: pytorch_optimizer.SOAP(
        p, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, precondition_frequency=FREQUENCY,
        max_precondition_dim=MAX_PRECOND_DIM, merge_dims=False))
    return candidates


def refresh_steps(frequency: Frequency, steps: int) -> set[int]:
    """The updates k = 1..steps after which the bases are refreshed (gradchain's rule; HeavyBall
    and pytorch-optimizer refresh at the same k for a constant frequency)."""
    due, accumulator = set(), 0.0
    for k in range(1, steps + 1):
        refresh, accumulator = refresh_due(frequency, k, accumulator)
        if refresh:
            due.add(k)
    return due


class Runner:
    """One candidate: an optimizer over its own copy of the parameters."""

    def __init__(self, make: Factory, template: list[nn.Parameter], grads: list[Tensor]) -> None:
        self.params = [nn.Parameter(p.detach().clone()) for p in template]
        self.grads = grads
        self.optimizer = make(self.params)

    def step(self) -> float:
        """Seconds of one ``optimizer.step()``, after a fresh copy of the gradients."""
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


def fixed_gradients(small: bool) -> tuple[list[nn.Parameter], list[Tensor]]:
    """The model's parameters and random gradients, as ``gpt_parameters_with_gradients``."""
    torch.manual_seed(0)
    template = gpt_parameters(**SMALL_MODEL) if small else gpt_parameters()
    return template, [torch.randn_like(p) * 1e-2 for p in template]


def warm_up(name: str, contender: Contender, template: list[nn.Parameter],
            grads: list[Tensor]) -> None:
    """Compile on a throwaway instance: init, then one refresh period."""
    runner = Runner(contender.make, template, grads)
    seconds = sum(runner.step() for _ in range(FREQUENCY + 1))
    print(f"  warm-up {name}: {seconds:.1f} s")


def measure(runners: dict[str, Runner], repeats: int) -> tuple[dict[str, float],
                                                                dict[str, list[float]]]:
    """Init seconds, then the seconds of ``repeats`` steps, the candidates taking turns."""
    torch.linalg.eigh(torch.eye(8))  # load LAPACK before the first candidate's init is timed
    torch.linalg.qr(torch.eye(8))
    init = {name: runner.step() for name, runner in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            times[name].append(runner.step())
    return init, times


def step_time(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.repeats % FREQUENCY:
        raise SystemExit(f"--repeats must be a positive multiple of the refresh period "
                         f"{FREQUENCY}, got {args.repeats}")
    torch.set_num_threads(args.threads)
    template, grads = fixed_gradients(args.small)
    count = sum(p.numel() for p in template)
    print(f"{count / 1e6:.1f}M parameters in {len(template)} tensors, {args.threads} threads, "
          f"torch {torch.__version__}, heavyball {version('heavyball')}, pytorch_optimizer "
          f"{version('pytorch_optimizer')}; {args.repeats} steps after init")

    # HeavyBall's project() compiles one variant per pattern of preconditioned axes and
    # direction (about a dozen here); dynamo's default limit of 8 would leave the rest eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    candidates = contenders(compile=not args.no_compile)
    for name, contender in candidates.items():
        if contender.compiled:
            warm_up(name, contender, template, grads)
    runners = {name: Runner(c.make, template, grads) for name, c in candidates.items()}
    init, times = measure(runners, args.repeats)

    amortized = {name: statistics.fmean(t) for name, t in times.items()}
    fastest_peer = min(amortized[name] for name, c in candidates.items() if c.peer)
    print("\n| optimizer | init (s) | median non-refresh step (ms) | amortized step (ms) | "
          "vs fastest peer | refreshes | state |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, contender in candidates.items():
        due = refresh_steps(contender.frequency, args.repeats)
        plain = [t for k, t in enumerate(times[name], start=1) if k not in due]
        median = f"{statistics.median(plain) * 1e3:.1f}" if plain else "n/a"
        print(f"| {name} | {init[name]:.2f} | {median} | {amortized[name] * 1e3:.1f} | "
              f"{amortized[name] / fastest_peer:.2f}x | {len(due)}/{args.repeats} | "
              f"{state_bytes(runners[name].optimizer) / 2**20:.0f} MiB |")


# ----------------------------------------------------------------------------------------------
# Task


@dataclass(frozen=True)
class Run:
    """One training run on the task."""

    label: str
    lr: float
    result: TrainResult


def train_run(label: str, make: Callable[[Any, float], torch.optim.Optimizer], lr: float,
              config: TaskConfig) -> Run:
    start = time.perf_counter()
    result = train(lambda params: make(params, lr), config)
    print(f"  {label} lr={lr:g}: val loss {result.final_val_loss:.3f}, "
          f"{time.perf_counter() - start:.0f} s")
    return Run(label, lr, result)


def best(runs: list[Run]) -> Run:
    """The run with the lowest final validation loss (diverged runs last)."""
    def loss(run: Run) -> float:
        value = run.result.final_val_loss
        return value if math.isfinite(value) else math.inf
    return min(runs, key=loss)


def first_reaching(result: TrainResult, target: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at or below ``target``."""
    for step, loss, seconds in zip(result.val_steps, result.val_loss, result.val_seconds):
        if loss <= target:
            return step, seconds
    return None


def loss_at_seconds(result: TrainResult, seconds: float) -> float:
    """Validation loss of the last evaluation within ``seconds`` of training time."""
    return [loss for loss, at in zip(result.val_loss, result.val_seconds) if at <= seconds][-1]


def print_sweep(runs: list[Run], best_ids: set[int]) -> None:
    print("\n| optimizer | lr | val loss | train loss | ms/step | ms/opt.step | state |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        r = run.result
        mark = " (best)" if id(run) in best_ids else ""
        print(f"| {run.label}{mark} | {run.lr:g} | {r.final_val_loss:.3f} | "
              f"{r.final_train_loss:.3f} | {r.ms_per_step:.1f} | {r.ms_per_opt_step:.2f} | "
              f"{r.state_bytes / 2**20:.1f} MiB |")


def print_against(runs: list[Run], reference: Run) -> None:
    ref = reference.result
    target, steps, seconds = ref.final_val_loss, ref.steps[-1], ref.seconds[-1]
    print(f"\nAgainst {reference.label} (lr {reference.lr:g}): its final val loss {target:.3f} "
          f"after {steps} steps, {seconds:.1f} s of training.\n")
    print("| optimizer | lr | val loss | step reaching AdamW's final | fraction of AdamW's "
          "steps | seconds to it | fraction of AdamW's seconds | val loss at AdamW's seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        reached = first_reaching(run.result, target)
        where = ("not reached | n/a | not reached | n/a" if reached is None else
                 f"{reached[0]} | {reached[0] / steps:.2f} | {reached[1]:.1f} | "
                 f"{reached[1] / seconds:.2f}")
        print(f"| {run.label} | {run.lr:g} | {run.result.final_val_loss:.3f} | {where} | "
              f"{loss_at_seconds(run.result, seconds):.3f} |")


def plot(runs: list[Run], target: float, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; no plot written to {path}")
        return
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run in runs:
        label = f"{run.label} lr={run.lr:g}"
        by_step.plot(run.result.val_steps, run.result.val_loss, label=label)
        by_time.plot(run.result.val_seconds, run.result.val_loss, label=label)
    for axes, xlabel in ((by_step, "step"), (by_time, "training seconds")):
        axes.axhline(target, color="grey", linestyle=":", linewidth=1,
                     label="AdamW's final val loss")
        axes.set_xlabel(xlabel)
        axes.grid(alpha=0.3)
    by_step.set_ylabel("validation loss")
    by_time.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def task(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    overrides = {key: value for key, value in (("steps", args.steps),
                                               ("eval_every", args.eval_every))
                 if value is not None}
    config = TaskConfig.small(**overrides) if args.small else TaskConfig.from_env(**overrides)
    adamw_defaults = DEFAULT_HYPERPARAMETERS["adamw"]
    print(f"char-LM task (d_model {config.d_model}, {config.n_layers} layers, batch "
          f"{config.batch_size}x{config.seq_len}), {config.steps} steps, validation every "
          f"{config.eval_every}, {args.threads} threads, torch {torch.__version__}")

    adamw = [train_run("AdamW", lambda p, lr: AdamW(p, **{**adamw_defaults, "lr": lr}), lr,
                       config) for lr in args.adamw_lrs or [adamw_defaults["lr"]]]
    soap = [train_run("SOAP", lambda p, lr: SOAP(p, lr=lr), lr, config)
            for lr in args.soap_lrs]
    reference, soap_best = best(adamw), best(soap)
    schedule = train_run("PrecondSchedulePaLMSOAP",
                         lambda p, lr: PrecondSchedulePaLMSOAP(p, lr=lr), soap_best.lr, config)

    print_sweep([*adamw, *soap, schedule], {id(reference), id(soap_best)})
    print_against([reference, soap_best, schedule], reference)
    if args.plot:
        plot([reference, soap_best, schedule], reference.result.final_val_loss, args.plot)


# ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--small", action="store_true", help="tiny sizes, for smoke tests")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part", required=True)
    steps = parts.add_parser("step-time", parents=[common], help="optimizer step time, state")
    steps.add_argument("--repeats", type=int, default=2 * FREQUENCY,
                       help=f"measured steps after init, a multiple of {FREQUENCY}")
    steps.add_argument("--no-compile", action="store_true")
    steps.set_defaults(run=step_time)
    runs = parts.add_parser("task", parents=[common], help="loss at step and second vs AdamW")
    runs.add_argument("--soap-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    runs.add_argument("--adamw-lrs", type=float, nargs="+",
                      help="sweep AdamW too (default: its tuned learning rate only)")
    runs.add_argument("--steps", type=int, help="training steps (default: TaskConfig's)")
    runs.add_argument("--eval-every", type=int, help="default: TaskConfig's")
    runs.add_argument("--plot", metavar="PATH", help="save validation loss curves as an image")
    runs.set_defaults(run=task)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
