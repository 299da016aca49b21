"""Step time and state memory of gradchain's named recipes against their peers, interleaved.

The parameters and fixed random gradients are those of ``step_time.py`` (a GPT-like model, 27.3M
parameters in 76 tensors). Every recipe that has a peer is one interleaved run: gradchain eager
and compiled (``compile=True``) and every peer in every mode it offers, each candidate on its own
copy of the parameters, given a fresh copy of the same gradients before every step (HeavyBall and
pytorch-optimizer write into ``.grad``), taking turns one step each for ``--repeats`` rounds, so
drifts of the machine hit them all alike. One run per recipe rather than per family: the SOAP
family's 25 candidates would need about 22 GB at once.

Modes. Eager: gradchain eager, torch.optim's for-loop and foreach paths, HeavyBall, torch-SM3,
pytorch-optimizer (its for-loop and foreach paths where it has both). Compiled: gradchain
``compile=True``, torch's fused kernels (AdamW, SGD), and HeavyBall's own compiled mode, which in
0.8.1 exists for SOAP only (``benchmarks/soap.py``: its ``project``, ``compute_ggt`` and
``get_orthogonal_matrix_QR`` under ``torch.compile``). Where no peer has a compiled mode, the
compiled ratio is taken against the fastest peer of any mode (marked ``*``): it is the best the
peers offer. ``torch.compile(opt.step)`` on a HeavyBall or pytorch-optimizer step is not a mode:
their bias corrections are Python floats that change every step, so dynamo recompiles until its
limit and runs them eagerly.

Families (``--family``) and settings, equal across each recipe's candidates:

``adamw``
    ``AdamW``: lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.1.
``sgd``
    ``SGD``: lr 1e-2, momentum 0.9.
``sm3``
    ``SM3``: lr 1e-3, momentum 0; torch-SM3 (``pip install torch-SM3``, import name ``SM3``)
    and pytorch-optimizer's ``SM3``.
``mechanic``
    ``gradchain.mechanize(..., variant="pytorch")`` against ``mechanic_pytorch.mechanize``
    (its defaults), both around torch's AdamW (lr 1e-3, weight decay 0.01; foreach eager,
    fused compiled), and ``gradchain.mechanize`` around gradchain's ``AdamW``.
``heavyball-adam``
    ``ForeachAdamW``, ``ForeachLaProp``, ``ForeachADOPT``, ``ForeachSFAdamW``,
    ``PaLMForeachSFAdamW``: lr 1e-3, betas (0.9, 0.99) (PaLM: beta 0.9, beta2_scale 0.8), eps
    1e-8, weight decay 0.01, warmup_steps 1 (HeavyBall 0.8.1 divides by a warm-up of 0). Peers:
    HeavyBall 0.8.1 and pytorch-optimizer's ``LaProp``, ``ADOPT`` and ``ScheduleFreeAdamW``
    (decoupled weight decay). HeavyBall 0.8.1's ``ForeachAdamW`` does not run (it calls
    ``lerp_`` on a tuple) and is not exported; torch's AdamW stands in as its peer.
``soap``
    The six SOAP recipes at ``soap.py``'s settings: lr 3e-3, betas (0.9, 0.95) (PaLM: beta 0.9,
    beta2_scale 0.8), weight decay 0.01, max_precond_dim 2048, merged dimensions, bases refreshed
    every 10 updates; the ``PrecondSchedule`` classes refresh on their schedule, (1/3, 9), which
    early on means almost every update in both libraries (gradchain's deterministic rule,
    HeavyBall's random draw at the same rate). Peers: HeavyBall 0.8.1 eager and compiled, and
    pytorch-optimizer's ``SOAP`` (without merged dimensions, which fail on its 1-D parameters;
    merging changes none of this model's matrices) for ``ForeachSOAP``. The SOAP ratios are of
    the amortized step, the mean over all measured steps, refreshes included: 10 rounds (updates
    3 to 12, one refresh) at the constant frequency, 4 on the schedule (updates 3 to 6, all of
    them refreshes in both libraries). ``ForeachSOAP`` against HeavyBall and pytorch-optimizer
    eagerly is ``soap.py step-time``'s measurement.

Warm-up. Every candidate first takes three steps that are not timed, reported as "warm-up
(s)": state allocation, SOAP's initialising call (an ``eigh`` of every Gram matrix) and, for the
compiled candidates, compilation (the first call and the step count's first change). Compiled
candidates warm up on the instance that is measured: gradchain's compiled step is one per
optimizer, so a throwaway instance would compile anew. Dynamo's recompile limit is raised to 64
and its caches are reset before every recipe; a compilation during the measured rounds is
reported.

Reported per recipe: every candidate's median step (and the amortized mean for SOAP), its ratio
to the fastest peer of its mode, and the bytes of its state (every tensor of ``state_dict()``,
nested containers included, each storage once: ``gradchain.tasks.charlm.state_bytes``).
``--markdown`` also prints one summary row per recipe, as in the README.

Needs heavyball 0.8.1, pytorch-optimizer, torch-SM3 and mechanic-pytorch
(``pip install -e .[bench]``).

    python benchmarks/peers.py                               # every family, 25-40 minutes here
    python benchmarks/peers.py --family heavyball-adam --repeats 40
    python benchmarks/peers.py --family soap --no-compile
    python benchmarks/peers.py --family soap --recipe PrecondSchedule --markdown
    python benchmarks/peers.py --family adamw --markdown
    python benchmarks/peers.py --small --repeats 3           # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import heavyball
import mechanic_pytorch
import pytorch_optimizer
import torch
from SM3 import SM3 as TorchSM3
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from soap import Runner, fixed_gradients, heavyball_compiled_class  # noqa: E402

import gradchain.optimizers as ours  # noqa: E402
from gradchain import mechanize  # noqa: E402
from gradchain.tasks.charlm import state_bytes  # noqa: E402

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

FAMILIES = ("adamw", "sgd", "sm3", "mechanic", "heavyball-adam", "soap")
SOAP_FREQUENCY = 10
WARM_UP = 3  # untimed steps: state allocation, compilation, SOAP's initialising call
REPEATS = 30
#: rounds of the PrecondSchedule recipes, which refresh at almost every step early on
SCHEDULED_REPEATS = 4
RECOMPILE_LIMIT = 64
FOOTNOTE = "* no peer has a compiled mode: against the fastest peer of any mode"


@dataclass(frozen=True)
class Candidate:
    """One optimizer of a recipe's run, from gradchain or a peer library, eager or compiled."""

    label: str
    library: str
    make: Factory
    compiled: bool = False

    @property
    def ours(self) -> bool:
        return self.library == "gradchain"


@dataclass(frozen=True)
class Recipe:
    """A gradchain recipe and its candidates, measured in one interleaved run."""

    name: str
    candidates: list[Candidate]
    amortized: bool = False  # rank by the mean step (SOAP's refreshes), not the median
    repeats: int = REPEATS  # measured rounds unless --repeats says otherwise


@dataclass
class Timing:
    """The measurement of one candidate."""

    warm_up: float  # seconds of the warm-up steps
    steps: list[float] = field(default_factory=list)
    state: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.steps)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.steps)


# ----------------------------------------------------------------------------------------------
# Candidates


def gradchain_pair(label: str, make: Callable[..., torch.optim.Optimizer], **hyper: object
                   ) -> list[Candidate]:
    """gradchain's recipe eager and compiled."""
    return [Candidate(f"{label} eager", "gradchain", lambda p: make(p, **hyper)),
            Candidate(f"{label} compiled", "gradchain", lambda p: make(p, compile=True, **hyper),
                      compiled=True)]


def torch_paths(name: str, cls: type[torch.optim.Optimizer], **hyper: object
                ) -> list[Candidate]:
    """torch.optim's for-loop, foreach (eager) and fused (compiled mode) paths."""
    return [Candidate(f"torch {name} for-loop", "torch", lambda p: cls(p, foreach=False, **hyper)),
            Candidate(f"torch {name} foreach", "torch", lambda p: cls(p, foreach=True, **hyper)),
            Candidate(f"torch {name} fused", "torch", lambda p: cls(p, fused=True, **hyper),
                      compiled=True)]


def pytorch_optimizer_paths(cls: type[torch.optim.Optimizer], **hyper: object
                            ) -> list[Candidate]:
    """pytorch-optimizer's for-loop and foreach paths."""
    name = f"pytorch_optimizer {cls.__name__}"
    return [Candidate(f"{name} for-loop", "pytorch_optimizer",
                      lambda p: cls(p, foreach=False, **hyper)),
            Candidate(f"{name} foreach", "pytorch_optimizer",
                      lambda p: cls(p, foreach=True, **hyper))]


def adamw_family() -> list[Recipe]:
    hyper = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    return [Recipe("AdamW", [*gradchain_pair("gradchain AdamW", ours.AdamW, **hyper),
                             *torch_paths("AdamW", torch.optim.AdamW, **hyper)])]


def sgd_family() -> list[Recipe]:
    hyper = {"lr": 1e-2, "momentum": 0.9}
    return [Recipe("SGD", [*gradchain_pair("gradchain SGD", ours.SGD, **hyper),
                           *torch_paths("SGD", torch.optim.SGD, **hyper)])]


def sm3_family() -> list[Recipe]:
    hyper = {"lr": 1e-3, "momentum": 0.0}
    return [Recipe("SM3", [*gradchain_pair("gradchain SM3", ours.SM3, **hyper),
                           Candidate("torch-SM3", "torch-SM3", lambda p: TorchSM3(p, **hyper)),
                           *pytorch_optimizer_paths(pytorch_optimizer.SM3, **hyper)])]


def mechanic_family() -> list[Recipe]:
    adamw = {"lr": 1e-3, "weight_decay": 0.01}
    base = torch.optim.AdamW
    wrappers = {("gradchain", "gradchain.mechanize"): lambda cls: mechanize(cls, variant="pytorch"),
                ("mechanic_pytorch", "mechanic_pytorch.mechanize"): mechanic_pytorch.mechanize}
    candidates = []
    for (library, name), wrap in wrappers.items():
        candidates += [
            Candidate(f"{name}(torch AdamW foreach)", library,
                      lambda p, wrap=wrap: wrap(base)(p, foreach=True, **adamw)),
            Candidate(f"{name}(torch AdamW fused)", library,
                      lambda p, wrap=wrap: wrap(base)(p, fused=True, **adamw), compiled=True)]
    candidates += gradchain_pair("gradchain.mechanize(gradchain AdamW)",
                                 mechanize(ours.AdamW, variant="pytorch"), **adamw)
    return [Recipe("mechanize", candidates)]


def heavyball_adam_family() -> list[Recipe]:
    hyper = {"lr": 1e-3, "eps": 1e-8, "weight_decay": 0.01}
    adam = {**hyper, "betas": (0.9, 0.99)}
    palm = {**hyper, "beta": 0.9, "beta2_scale": 0.8, "warmup_steps": 1}
    heavy = {**adam, "warmup_steps": 1}

    def hb(cls: type[torch.optim.Optimizer], **kwargs: object) -> Candidate:
        return Candidate(f"heavyball {cls.__name__}", "heavyball", lambda p: cls(p, **kwargs))

    return [
        Recipe("ForeachAdamW", [
            *gradchain_pair("gradchain ForeachAdamW", ours.ForeachAdamW, **heavy),
            *torch_paths("AdamW", torch.optim.AdamW, **adam)]),
        Recipe("ForeachLaProp", [
            *gradchain_pair("gradchain ForeachLaProp", ours.ForeachLaProp, **heavy),
            hb(heavyball.ForeachLaProp, **heavy),
            *pytorch_optimizer_paths(pytorch_optimizer.LaProp, **adam)]),
        Recipe("ForeachADOPT", [
            *gradchain_pair("gradchain ForeachADOPT", ours.ForeachADOPT, **heavy),
            hb(heavyball.ForeachADOPT, **heavy),
            *pytorch_optimizer_paths(pytorch_optimizer.ADOPT, weight_decouple=True, **adam)]),
        Recipe("ForeachSFAdamW", [
            *gradchain_pair("gradchain ForeachSFAdamW", ours.ForeachSFAdamW, **heavy),
            hb(heavyball.ForeachSFAdamW, **heavy),
            *pytorch_optimizer_paths(pytorch_optimizer.ScheduleFreeAdamW, warmup_steps=1,
                                     **adam)]),
        Recipe("PaLMForeachSFAdamW", [
            *gradchain_pair("gradchain PaLMForeachSFAdamW", ours.PaLMForeachSFAdamW, **palm),
            hb(heavyball.PaLMForeachSFAdamW, **palm)]),
    ]


def pytorch_optimizer_soap(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """pytorch-optimizer's SOAP at the SOAP family's settings, dimensions not merged."""
    return pytorch_optimizer.SOAP(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01,
                                  precondition_frequency=SOAP_FREQUENCY,
                                  max_precondition_dim=2048, merge_dims=False)


def soap_family() -> list[Recipe]:
    common = {"lr": 3e-3, "weight_decay": 0.01, "max_precond_dim": 2048, "merge_dims": True}
    fixed = {"precondition_frequency": SOAP_FREQUENCY}
    adam, palm = {"betas": (0.9, 0.95)}, {"beta": 0.9, "beta2_scale": 0.8}
    pairs = {  # ours -> HeavyBall's class, the settings of both, and the measured rounds
        "ForeachSOAP": (heavyball.ForeachSOAP, {**adam, **fixed}, SOAP_FREQUENCY),
        "PaLMForeachSOAP": (heavyball.PaLMForeachSOAP, {**palm, **fixed}, SOAP_FREQUENCY),
        "SFPaLMForeachSOAP": (heavyball.SFPaLMForeachSOAP, {**palm, **fixed}, SOAP_FREQUENCY),
        "PrecondScheduleSFPaLMForeachSOAP": (heavyball.PrecondScheduleSFPaLMSOAP, palm,
                                             SCHEDULED_REPEATS),
        "PrecondSchedulePaLMForeachSOAP": (heavyball.PrecondSchedulePaLMForeachSOAP, palm,
                                           SCHEDULED_REPEATS),
        "PrecondScheduleForeachSOAP": (heavyball.PrecondScheduleForeachSOAP, adam,
                                       SCHEDULED_REPEATS),
    }
    recipes = []
    for name, (peer, settings, repeats) in pairs.items():
        hyper = {**common, **settings}
        compiled = heavyball_compiled_class(peer)
        candidates = [
            *gradchain_pair(f"gradchain {name}", getattr(ours, name), **hyper),
            Candidate(f"heavyball {peer.__name__} eager", "heavyball",
                      lambda p, c=peer, h=hyper: c(p, **h)),
            Candidate(f"heavyball {peer.__name__} compiled", "heavyball",
                      lambda p, c=compiled, h=hyper: c(p, **h), compiled=True)]
        if name == "ForeachSOAP":
            candidates.append(Candidate("pytorch_optimizer SOAP", "pytorch_optimizer",
                                        pytorch_optimizer_soap))
        recipes.append(Recipe(name, candidates, amortized=True, repeats=repeats))
    return recipes


BUILDERS: dict[str, Callable[[], list[Recipe]]] = {
    "adamw": adamw_family, "sgd": sgd_family, "sm3": sm3_family, "mechanic": mechanic_family,
    "heavyball-adam": heavyball_adam_family, "soap": soap_family,
}


# ----------------------------------------------------------------------------------------------
# Measurement


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled so far in this process."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def measure(recipe: Recipe, template: list[nn.Parameter], grads: list[Tensor], repeats: int
            ) -> dict[str, Timing]:
    """Warm-up steps, then ``repeats`` interleaved rounds (each starting one candidate later,
    so no candidate always follows the same one)."""
    torch._dynamo.reset()
    runners = {c.label: Runner(c.make, template, grads) for c in recipe.candidates}
    timings = {label: Timing(sum(runner.step() for _ in range(WARM_UP)))
               for label, runner in runners.items()}
    before = graphs_compiled()
    labels = list(runners)
    for round_ in range(repeats):
        shift = round_ % len(labels)
        for label in labels[shift:] + labels[:shift]:
            timings[label].steps.append(runners[label].step())
    if graphs_compiled() != before:
        print(f"  note: {graphs_compiled() - before} graphs were compiled during the measured "
              "rounds of this recipe")
    for label, runner in runners.items():
        timings[label].state = state_bytes(runner.optimizer)
    return timings


def fastest_peer(recipe: Recipe, timings: dict[str, Timing], compiled: bool
                 ) -> tuple[float, bool]:
    """The fastest peer's step in a mode, and whether it comes from that mode (else, where no
    peer has a compiled mode, the fastest peer of any mode)."""
    def cost(c: Candidate) -> float:
        t = timings[c.label]
        return t.mean if recipe.amortized else t.median

    peers = [c for c in recipe.candidates if not c.ours]
    same = [c for c in peers if c.compiled == compiled]
    return min(map(cost, same or peers)), bool(same)


# ----------------------------------------------------------------------------------------------
# Report


def print_recipe(recipe: Recipe, timings: dict[str, Timing]) -> None:
    amortized = " amortized (ms) |" if recipe.amortized else ""
    print(f"\n{recipe.name}\n\n| candidate | mode | median (ms) |{amortized} vs fastest peer | "
          f"state (MiB) | warm-up (s) |")
    print("|---|---|---:|" + ("---:|" if recipe.amortized else "") + "---:|---:|---:|")
    for c in recipe.candidates:
        t = timings[c.label]
        reference, same_mode = fastest_peer(recipe, timings, c.compiled)
        cost = t.mean if recipe.amortized else t.median
        mean = f" {t.mean * 1e3:.1f} |" if recipe.amortized else ""
        mark = "" if same_mode else "*"
        print(f"| {c.label} | {'compiled' if c.compiled else 'eager'} | {t.median * 1e3:.1f} |"
              f"{mean} {cost / reference:.2f}x{mark} | {t.state / 2**20:.1f} | {t.warm_up:.1f} |")


def summary_row(recipe: Recipe, timings: dict[str, Timing]) -> str:
    """``| recipe | peers | eager ms | vs peer | compiled ms | vs peer | state MiB |``."""
    peers = sorted({c.library for c in recipe.candidates if not c.ours})
    cells = [recipe.name, ", ".join(peers)]
    state = ""
    for compiled in (False, True):
        mine = [c for c in recipe.candidates if c.ours and c.compiled == compiled]
        if not mine:
            cells += ["n/a", "n/a"]
            continue
        t = timings[mine[0].label]
        cost = t.mean if recipe.amortized else t.median
        reference, same_mode = fastest_peer(recipe, timings, compiled)
        cells += [f"{cost * 1e3:.1f}", f"{cost / reference:.2f}x{'' if same_mode else '*'}"]
        state = state or f"{t.state / 2**20:.1f}"
    return "| " + " | ".join([*cells, state]) + " |"


def print_summary(rows: list[str]) -> None:
    print("\n| recipe | peers | eager (ms) | vs fastest eager peer | compiled (ms) | "
          "vs fastest compiled peer | state (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row)
    print(f"\n{FOOTNOTE}")


# ----------------------------------------------------------------------------------------------


def without_compiled(recipe: Recipe) -> Recipe:
    return replace(recipe, candidates=[c for c in recipe.candidates if not c.compiled])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--repeats", type=int, help=f"measured rounds (default {REPEATS}; "
                        f"SOAP: {SOAP_FREQUENCY}, a refresh period, and {SCHEDULED_REPEATS} "
                        "on the preconditioner schedule)")
    parser.add_argument("--recipe", metavar="TEXT",
                        help="only the recipes whose name contains TEXT")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager candidates only")
    parser.add_argument("--markdown", action="store_true", help="also print the summary rows")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for smoke tests")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    template, grads = fixed_gradients(args.small)
    count = sum(p.numel() for p in template)
    print(f"{count / 1e6:.1f}M parameters in {len(template)} tensors, {args.threads} threads, "
          f"torch {torch.__version__}, heavyball {version('heavyball')}, pytorch_optimizer "
          f"{version('pytorch_optimizer')}, torch-SM3 {version('torch-SM3')}, "
          f"mechanic-pytorch {version('mechanic-pytorch')}\n{FOOTNOTE}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    rows = []
    for family in FAMILIES if args.family == "all" else [args.family]:
        for recipe in BUILDERS[family]():
            if args.recipe is not None and args.recipe not in recipe.name:
                continue
            if args.no_compile:
                recipe = without_compiled(recipe)
            repeats = args.repeats or recipe.repeats
            start = time.perf_counter()
            timings = measure(recipe, template, grads, repeats)
            print_recipe(recipe, timings)
            print(f"({repeats} rounds; {time.perf_counter() - start:.0f} s with the warm-up)",
                  flush=True)
            rows.append(summary_row(recipe, timings))
    if args.markdown:
        print_summary(rows)


if __name__ == "__main__":
    main()
