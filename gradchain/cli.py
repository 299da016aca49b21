"""The ``gradchain`` command line: ``compare`` recipes on the embedded task, ``list`` the pieces.

Examples::

    python -m gradchain list
    python -m gradchain compare                       # adamw and sgd, about two minutes
    python -m gradchain compare adam sgd --lr sgd=0.1 --steps 300 --plot runs.png
    python -m gradchain compare adamw mechanize:adamw marthe hd-adam
    GRADCHAIN_SMALL=1 python -m gradchain compare     # a few seconds (or: --small)

The task and matplotlib are imported inside the commands that use them.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gradchain.tasks.charlm import TrainResult

__all__ = ["main", "ProgressBar", "format_bytes", "format_table", "plot_comparison"]

DEFAULT_RECIPES = ("adamw", "sgd")
DEFAULT_PLOT = "gradchain_compare.png"
MECHANIZE = "mechanize:"  # prefix of a recipe run under Mechanic
PLOT_HINT = ('matplotlib is not installed, so no plot was written; '
             'get it with: pip install "gradchain[plot]"')


class UsageError(Exception):
    """A command line that names something that does not exist; reported without a traceback."""


@dataclass(frozen=True)
class Run:
    """One recipe to train: its name, optimizer class and the hyperparameters it is built with."""

    name: str
    cls: type
    hyperparameters: dict[str, Any]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Example:
        >>> main(["list"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    try:
        return args.command(args)
    except UsageError as error:
        print(f"gradchain: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``compare`` and ``list`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="gradchain", description="Optimizers as chains of small gradient transformations."
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    compare = commands.add_parser(
        "compare",
        help="train recipes on the embedded character-level language model and compare them",
        description="Train each recipe from the same initial weights on the same batches of a "
        "small character-level transformer (Python's standard library as text), then print a "
        "table and plot the loss curves.",
    )
    compare.add_argument("recipes", nargs="*", metavar="RECIPE",
                         help=f"recipe names, or {MECHANIZE}<recipe> for a recipe under "
                         f"Mechanic (default: {' '.join(DEFAULT_RECIPES)})")
    compare.add_argument("--steps", type=_positive_int, help="training steps per recipe")
    compare.add_argument("--lr", type=_lr_override, action="append", default=[],
                         metavar="NAME=VALUE", help="learning rate of one recipe (repeatable)")
    compare.add_argument("--plot", default=DEFAULT_PLOT, metavar="PATH",
                         help=f"where to write the PNG plot (default: {DEFAULT_PLOT})")
    compare.add_argument("--seed", type=int, help="seed of the initial weights and the batches")
    compare.add_argument("--small", action="store_true",
                         help="a tiny model and a short run (also: GRADCHAIN_SMALL=1)")
    compare.set_defaults(command=compare_command)

    listing = commands.add_parser("list", help="list every transform, chain and recipe")
    listing.set_defaults(command=list_command)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _lr_override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        lr = float(value)
    except ValueError:
        lr = math.nan
    if not sep or not name or not lr > 0:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a positive VALUE, got {text!r}")
    return name.strip().lower(), lr


# ----------------------------------------------------------------------------------------- list


def list_command(args: argparse.Namespace) -> int:
    """Print every transform, chain and recipe, and every named optimizer, with one line each."""
    print(describe_components())
    return 0


def describe_components() -> str:
    """The text of ``gradchain list``: names and first docstring lines, under headings."""
    from gradchain import chains, transforms
    from gradchain.optimizers import OPTIMIZERS

    sections = {
        "Transforms (gradchain.transforms)":
            {name: getattr(transforms, name) for name in transforms.__all__},
        "Chains and recipes (gradchain.chains)":
            {name: getattr(chains, name) for name in chains.__all__},
        "Optimizers (gradchain.optimizers, names for `gradchain compare`)": OPTIMIZERS,
    }
    width = max(len(name) for entries in sections.values() for name in entries)
    blocks = []
    for heading, entries in sections.items():
        lines = [f"  {name:<{width}}  {_summary(obj)}" for name, obj in entries.items()]
        blocks.append("\n".join([heading, *lines]))
    return "\n\n".join(blocks)


def _summary(obj: object) -> str:
    """The summary of ``obj``'s docstring (its first paragraph, on one line) as plain text.

    Example:
        >>> def f():
        ...     "Scale by :math:`c`, ``in place``."
        >>> _summary(f)
        'Scale by c, in place.'
    """
    summary = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    return re.sub(r":\w+:`([^`]*)`", r"\1", summary).replace("``", "")


# -------------------------------------------------------------------------------------- compare


def compare_command(args: argparse.Namespace) -> int:
    """Train every requested recipe, print the comparison table and write the plot."""
    from gradchain.tasks.charlm import TaskConfig, train

    runs = resolve_runs(args.recipes or DEFAULT_RECIPES, dict(args.lr))
    overrides = {key: value for key, value in (("steps", args.steps), ("seed", args.seed))
                 if value is not None}
    config = TaskConfig.small(**overrides) if args.small else TaskConfig.from_env(**overrides)

    results: dict[str, TrainResult] = {}
    for run in runs:
        with ProgressBar(run.name) as progress:
            results[run.name] = train(partial(run.cls, **run.hyperparameters), config,
                                      progress=progress)
    print(comparison_table(runs, results))
    if plot_comparison(results, args.plot):
        print(f"plot written to {args.plot}")
    else:
        print(PLOT_HINT)
    return 0


def resolve_runs(names: Sequence[str], lr_overrides: dict[str, float]) -> list[Run]:
    """The recipes to train, with their hyperparameters for this task; ``UsageError`` if unknown.

    ``mechanize:<recipe>`` is any recipe under Mechanic's learned scale
    (``gradchain.mechanize``), with the recipe's tuned hyperparameters for this task except the
    learning rate, which is the base step that Mechanic scales: 1.0 unless given.
    The learning rate is, in order: ``lr_overrides[name]``, the task's tuned default
    (``charlm.DEFAULT_HYPERPARAMETERS``), the optimizer class's own default.
    """
    from gradchain.optimizers import OPTIMIZERS, optimizer_name
    from gradchain.optimizers.mechanic import mechanize
    from gradchain.tasks.charlm import DEFAULT_HYPERPARAMETERS

    def canonical(name: str) -> str:
        base = name[len(MECHANIZE):] if name.lower().startswith(MECHANIZE) else name
        key = optimizer_name(base) or base.lower()
        return MECHANIZE + key if base is not name else key

    names = list(dict.fromkeys(canonical(name) for name in names))
    lr_overrides = {canonical(name): lr for name, lr in lr_overrides.items()}
    available = ", ".join(sorted(OPTIMIZERS))
    for name in [*names, *lr_overrides]:
        if name.removeprefix(MECHANIZE) not in OPTIMIZERS:
            raise UsageError(f"unknown recipe {name!r}; available recipes: {available}, "
                             f"each also as {MECHANIZE}<recipe>")
    for name in lr_overrides:
        if name not in names:
            raise UsageError(f"--lr {name}=... names a recipe that is not being compared "
                             f"({', '.join(names)})")

    runs = []
    for name in names:
        base = name.removeprefix(MECHANIZE)
        hyperparameters = dict(DEFAULT_HYPERPARAMETERS.get(base, {}))
        cls = OPTIMIZERS[base]
        if name != base:
            cls = mechanize(cls)
            hyperparameters["lr"] = 1.0
        if name in lr_overrides:
            hyperparameters["lr"] = lr_overrides[name]
        if "lr" not in hyperparameters:
            hyperparameters["lr"] = _class_default_lr(name, cls)
        runs.append(Run(name, cls, hyperparameters))
    return runs


def _class_default_lr(name: str, cls: type) -> float:
    """The default ``lr`` of the optimizer class; ``UsageError`` when it has none."""
    parameter = inspect.signature(cls).parameters.get("lr")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise UsageError(f"recipe {name!r} has no default learning rate; pass --lr {name}=VALUE")
    return parameter.default


def comparison_table(runs: Sequence[Run], results: dict[str, TrainResult]) -> str:
    """One row per recipe: hyperparameters, final losses, step times and optimizer state size."""
    headers = ["recipe", "hyperparameters", "train loss", "val loss", "ms/step", "ms/opt.step",
               "state"]
    rows = []
    for run in runs:
        result = results[run.name]
        hyper = " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in run.hyperparameters.items())
        rows.append([run.name, hyper, f"{result.final_train_loss:.3f}",
                     f"{result.final_val_loss:.3f}", f"{result.ms_per_step:.1f}",
                     f"{result.ms_per_opt_step:.2f}", format_bytes(result.state_bytes)])
    return format_table(headers, rows, left=2)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Plain-text table: the first ``left`` columns left-aligned, the others right-aligned.

    Example:
        >>> print(format_table(["recipe", "val loss"], [["adamw", "1.66"]]))
        recipe  val loss
        ------  --------
        adamw       1.66
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(width) if i < left else str(cell).rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *map(line, rows)])


def format_bytes(n: int) -> str:
    """Human-readable size in binary units.

    Example:
        >>> format_bytes(107_725), format_bytes(512)
        ('105.2 KiB', '512 B')
    """
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


class ProgressBar:
    """Progress of one training run on stderr, as ``progress(step, total, loss)`` expects.

    On a terminal, one line redrawn in place (at most ten times a second), e.g.
    ``adamw  [#########...........]  120/300  loss 2.310``; elsewhere (CI logs, pipes) a plain
    line at each quarter of the run.

    Example:
        >>> with ProgressBar("adamw") as progress:  # doctest: +SKIP
        ...     train(factory, config, progress=progress)
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = self.stream.isatty()
        self._last_draw = -math.inf

    def __call__(self, step: int, total: int, loss: float) -> None:
        done = step == total
        if self.interactive:
            now = time.monotonic()
            if done or now - self._last_draw >= 0.1:
                self._last_draw = now
                filled = self.width * step // total
                bar = "#" * filled + "." * (self.width - filled)
                self.stream.write(f"\r{self.label}  [{bar}]  {step}/{total}  loss {loss:.3f}")
                self.stream.flush()
        elif done or step % max(1, total // 4) == 0:
            print(f"{self.label}: step {step}/{total}  loss {loss:.3f}", file=self.stream,
                  flush=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def plot_comparison(results: dict[str, TrainResult], path: str) -> bool:
    """Write a PNG of the loss curves: loss vs step and loss vs seconds, one colour per recipe.

    Thin lines are the minibatch training loss, markers the validation loss. Returns ``False``
    (and writes nothing) when matplotlib is not installed. Drawn on a bare
    ``matplotlib.figure.Figure``, which renders PNGs with Agg: no pyplot, no GUI backend, and
    no change to the backend of a notebook that calls it.

    Example (skipped in the doctests: it writes a file, and matplotlib takes seconds):
        >>> from gradchain.tasks.charlm import TrainResult
        >>> run = TrainResult(steps=[1, 2], train_loss=[5.2, 4.9], seconds=[0.1, 0.2],
        ...                   val_steps=[0, 2], val_loss=[5.5, 5.0], val_seconds=[0.0, 0.2])
        >>> plot_comparison({"adamw": run}, "losses.png")  # doctest: +SKIP
        True
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for index, (name, result) in enumerate(results.items()):
        color = f"C{index}"
        by_step.plot(result.steps, result.train_loss, color=color, lw=0.8, alpha=0.5,
                     label=f"{name} train")
        by_step.plot(result.val_steps, result.val_loss, "o-", color=color, label=f"{name} val")
        by_time.plot(result.seconds, result.train_loss, color=color, lw=0.8, alpha=0.5)
        by_time.plot(result.val_seconds, result.val_loss, "o-", color=color)
    by_step.set_ylim(top=_loss_axis_top(results))
    by_step.set(xlabel="step", ylabel="loss (nats / byte)", title="loss vs step")
    by_time.set(xlabel="training seconds", title="loss vs wall time")
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
    by_step.legend()
    figure.savefig(path, dpi=100)
    return True


def _loss_axis_top(results: dict[str, TrainResult]) -> float:
    """Top of the loss axis: a little above the first evaluation after step 0, so that the
    initial loss (ln 256 for every recipe) does not squeeze the part of the curves that differs."""
    initial = max(result.val_loss[0] for result in results.values())
    first = [result.val_loss[1] for result in results.values()
             if len(result.val_loss) > 1 and math.isfinite(result.val_loss[1])]
    return min(initial, 1.1 * max(first)) if first else initial
