"""Property-based tests (hypothesis) of every public transform, combinator and named recipe.

Every case draws its hyperparameters from their valid ranges (each one optional, so the
defaults come up too) and a problem: a list or dict tree of 1 to 3 leaves of rank 0 to 4,
sizes 0 to 64 per axis (at most 4096 entries in all), float32, float64 or bfloat16 parameters,
and 1 to 5 steps of finite gradients of several patterns (normal, spread over decades, half
zeros, all zeros) and magnitudes. Gradients come in the state dtype (float32 for bfloat16
parameters), as ``ChainOptimizer`` hands them over. Extras are given as a training loop gives
them: ``grads`` (the raw gradient; a chain adds it itself), ``val_grads`` and, on the steps
where ``needs_hvp`` asks, ``hvp`` of a diagonal quadratic whose curvature depends only on each
leaf's shape (so the subsets that ``masked`` and ``partition`` hand their members stay
consistent). Each update's output is added to the parameters.

Properties (``check_properties``): ``init`` leaves the parameters alone; every ``update``
returns the gradients' structure (tree type, names, shapes, dtypes), all finite, leaves the
gradients and parameters alone, and keeps the state's structure, shapes and dtypes those of
``init``. Cases add properties of their state: a positive finite learning rate
(``hypergrad_lr_value``), a finite non-negative scale (``mechanic_scale_value``), and the
schedule-free evaluation point (``schedule_free_eval_params``, ``to_eval``, ``to_train``).

eps is drawn > 0 where the math divides by :math:`\\sqrt{v} + \\epsilon` (or floors by eps):
with eps = 0 a zero gradient gives 0/0 by definition, as in torch.optim and optax. Runs are
short: gradients are arbitrary, not those of a loss, so a learning rate that adapts (HD,
MARTHE) may legitimately diverge on longer ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from gradchain import chains, transforms
from gradchain.chains import (adam, adamw, adamw_inplace, adopt, apply_if_finite, chain, esgd_m,
                              freeze, hd_adam, hd_sgd, inject_hyperparams, laprop, marthe, masked,
                              mechanize, multi_steps, named_chain, palm_sfadamw, palm_soap,
                              partition, precond_schedule_palm_soap,
                              precond_schedule_sf_palm_soap, precond_schedule_soap, rtho,
                              sf_palm_soap, sfadamw, sgd, sm3, soap)
from gradchain.core import (GradientTransformation, Tree, apply_updates, as_tree, find_state,
                            leaves, names, needs_hvp)
from gradchain.schedules import precond_schedule
from gradchain.transforms import (add_decayed_weights, clip, clip_by_agc, clip_by_global_norm,
                                  ema, hypergrad_lr, hypergrad_lr_value, identity,
                                  mechanic_scale, mechanic_scale_value, palm_beta2, qh_momentum,
                                  scale, scale_by_abs_hessian_diag, scale_by_adam,
                                  scale_by_adam_inplace, scale_by_adopt, scale_by_laprop,
                                  scale_by_learning_rate, scale_by_rms, scale_by_rms_inplace,
                                  scale_by_schedule, scale_by_sign, scale_by_sm3, schedule_free,
                                  schedule_free_eval_params, soap_precondition, to_eval, to_train,
                                  trace)
from gradchain.transforms.schedule_free import ScheduleFreeState

# hyper-steps clamped to the floor, skipped SOAP eigendecompositions: warned, and expected here
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])

MAX_RANK, MAX_SIZE, MAX_ELEMENTS, MAX_STEPS = 4, 64, 4096, 5
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
LEAF_NAMES = ("layer.weight", "layer.bias", "scale")
PATTERNS = ("normal", "spread", "half_zeros", "zeros")
WIDENED = {torch.bfloat16: torch.float32}  # the gradient dtype, as ChainOptimizer widens it


# ---------------------------------------------------------------------------------------------
# Problems: parameters, gradients, validation gradients and a Hessian-vector product


class Problem(NamedTuple):
    params: Tree
    grads: list[Tree]           # one tree per step
    val_grads: list[Tree]       # one tree per step
    curvature: float            # the scale of the quadratic's diagonal Hessian

    def hvp(self, vectors: Tree) -> Tree:
        """H v for f(x) = sum over leaves of a * x^2 / 2, a spread over [-c, c] (zeros included)
        by position within each leaf."""
        return as_tree(vectors, [v * self.diagonal(v) for v in leaves(vectors)])

    def diagonal(self, like: Tensor) -> Tensor:
        a = torch.linspace(-self.curvature, self.curvature, like.numel(), dtype=torch.float64)
        return a.reshape(like.shape).to(like.dtype)


@st.composite
def shapes(draw: st.DrawFn, max_elements: int) -> tuple[int, ...]:
    """Rank 0 to 4, each size 0 to 64, at most ``max_elements`` entries."""
    sizes: list[int] = []
    room = max_elements
    for _ in range(draw(st.integers(0, MAX_RANK))):
        size = draw(st.integers(0, min(MAX_SIZE, room)))
        sizes.append(size)
        room //= max(size, 1)
    return tuple(draw(st.permutations(sizes)))


def random_tensor(gen: torch.Generator, shape: tuple[int, ...], pattern: str, magnitude: float,
                  dtype: torch.dtype) -> Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if pattern == "spread":
        x = x * torch.exp(2.0 * torch.randn(shape, generator=gen, dtype=torch.float64))
    elif pattern == "half_zeros":
        x = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, 0.0, x)
    elif pattern == "zeros":
        x = torch.zeros_like(x)
    return (magnitude * x).to(dtype)


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    count = draw(st.integers(1, len(LEAF_NAMES)))
    leaf_shapes = [draw(shapes(MAX_ELEMENTS // count)) for _ in range(count)]
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in range(count)]
    kind = draw(st.sampled_from(["list", "dict"]))
    steps = draw(st.integers(1, MAX_STEPS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))

    def tree(pattern: str, widen: bool) -> Tree:
        magnitude = 10.0 ** draw(st.integers(-3, 3))
        tensors = [random_tensor(gen, shape, pattern, magnitude, WIDENED.get(d, d) if widen else d)
                   for shape, d in zip(leaf_shapes, dtypes)]
        return dict(zip(LEAF_NAMES, tensors)) if kind == "dict" else tensors

    params = tree(draw(st.sampled_from(PATTERNS)), widen=False)
    grads = [tree(draw(st.sampled_from(PATTERNS)), widen=True) for _ in range(steps)]
    val_grads = [tree("normal", widen=True) for _ in range(steps)]
    return Problem(params, grads, val_grads, draw(st.floats(0.0, 10.0)))


# ---------------------------------------------------------------------------------------------
# The properties


def clone(tree: Tree) -> Tree:
    return as_tree(tree, [t.clone() for t in leaves(tree)])


def signature(state: Any) -> Any:
    """The structure of a state (container types, NamedTuple types, dict keys, list lengths,
    Python scalar types) with every tensor replaced by its shape and dtype."""
    if isinstance(state, Tensor):
        return "tensor", tuple(state.shape), state.dtype
    if isinstance(state, dict):
        return "dict", tuple((key, signature(value)) for key, value in state.items())
    if isinstance(state, (tuple, list)):
        return type(state).__name__, tuple(signature(value) for value in state)
    return type(state).__name__


def assert_like(out: Any, like: Tree, what: str) -> None:
    """``out`` has the tree type, names, shapes and dtypes of ``like``, and is finite."""
    assert type(out) is type(like), f"{what}: a {type(out).__name__} for a {type(like).__name__}"
    assert names(out) == names(like), f"{what}: names {names(out)}, expected {names(like)}"
    for name, o, t in zip(names(like), leaves(out), leaves(like)):
        assert isinstance(o, Tensor) and o.layout == torch.strided, f"{what}, {name}: {o!r}"
        assert o.shape == t.shape, f"{what}, {name}: shape {tuple(o.shape)}, " \
                                   f"expected {tuple(t.shape)}"
        assert o.dtype == t.dtype, f"{what}, {name}: dtype {o.dtype}, expected {t.dtype}"
        assert bool(o.isfinite().all()), f"{what}, {name}: not finite"


def assert_unchanged(tree: Tree, before: Tree, what: str) -> None:
    for name, t, b in zip(names(tree), leaves(tree), leaves(before)):
        assert t.dtype == b.dtype and torch.equal(t, b), f"{what} changed {name}"


StateCheck = Callable[[Any, Tree, dict[str, Any]], None]


def check_properties(tx: GradientTransformation, problem: Problem, chained: bool = False,
                     check_state: StateCheck | None = None,
                     hyperparameters: dict[str, Any] | None = None) -> None:
    """Run ``tx`` over the problem's steps and assert the properties of the module docstring.

    ``chained``: ``tx`` is an outermost chain, which adds the ``grads`` extra itself."""
    params = clone(problem.params)
    before = clone(params)
    state = tx.init(params)
    assert_unchanged(params, before, "init")
    expected = signature(state)
    for t, (grads, val_grads) in enumerate(zip(problem.grads, problem.val_grads), start=1):
        extras: dict[str, Any] = {"val_grads": val_grads}
        if not chained:
            extras["grads"] = grads
        if needs_hvp(tx, state):
            extras["hvp"] = problem.hvp
        grads_before, params_before = clone(grads), clone(params)
        out, state = tx.update(grads, state, params, **extras)
        assert_like(out, grads, f"call {t}")
        assert_unchanged(grads, grads_before, f"call {t}")
        assert_unchanged(params, params_before, f"call {t}")
        assert signature(state) == expected, f"call {t} changed the state's structure"
        apply_updates(params, out)
        if check_state is not None:
            check_state(state, params, hyperparameters or {})


# ---------------------------------------------------------------------------------------------
# Properties of states


def check_learning_rate(state: Any, params: Tree, hyperparameters: dict[str, Any]) -> None:
    lr = hypergrad_lr_value(state)
    assert math.isfinite(lr) and lr > 0, f"learning rate {lr}"
    assert lr >= (hyperparameters.get("min_lr") or 0.0), f"learning rate {lr} below min_lr"


def check_mechanic_scale(state: Any, params: Tree, hyperparameters: dict[str, Any]) -> None:
    value = mechanic_scale_value(state)
    assert math.isfinite(value) and value >= 0, f"Mechanic's scale {value}"


def check_evaluation_point(state: Any, params: Tree, hyperparameters: dict[str, Any]) -> None:
    """x from y and z: the parameters' structure, finite; ``to_eval`` moves y to exactly x and
    ``to_train`` back to y up to rounding (in the parameter dtype, twice)."""
    b1 = hyperparameters.get("b1", 0.9)
    if b1 < 1e-3:  # x = (y - (1 - b1) z) / b1 overflows as b1 -> 0 (and b1 = 0 is refused)
        return
    x = schedule_free_eval_params(state, params, b1)
    assert_like(x, params, "schedule_free_eval_params")
    moved = clone(params)
    to_eval(state, moved, b1)
    assert all(torch.equal(m, e) for m, e in zip(leaves(moved), leaves(x))), "to_eval is not x"
    to_train(state, moved, b1)
    z = find_state(state, ScheduleFreeState, "schedule_free").z
    for name, back, y, zi in zip(names(params), leaves(moved), leaves(params), z):
        assert back.dtype == y.dtype and back.shape == y.shape, name
        y64, z64 = y.double(), zi.double()
        tolerance = 8 * torch.finfo(y.dtype).eps * (y64.abs() + 2 * z64.abs()) + 1e-300
        assert bool(((back.double() - y64).abs() <= tolerance).all()), \
            f"to_train(to_eval(y)) is not y for {name}"


# ---------------------------------------------------------------------------------------------
# Hyperparameters


class Cycling:
    """A schedule that repeats ``values`` (any values of a valid range), with a readable repr
    for hypothesis' reports."""

    def __init__(self, values: list[float]) -> None:
        self.values = tuple(values)

    def __call__(self, count: int) -> float:
        return self.values[count % len(self.values)]

    def __repr__(self) -> str:
        return f"Cycling({list(self.values)})"


class ByRank:
    """A mask or label selector ``(name, param) -> value`` by the parameter's rank."""

    def __init__(self, min_rank: int, chosen: Any = True, other: Any = False) -> None:
        self.min_rank, self.chosen, self.other = min_rank, chosen, other

    def __call__(self, name: str, param: Tensor) -> Any:
        return self.chosen if param.ndim >= self.min_rank else self.other

    def __repr__(self) -> str:
        return f"ByRank({self.min_rank}, {self.chosen!r}, {self.other!r})"


def hyper(values: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    """A number of ``values``, or a schedule of them."""
    return values | st.lists(values, min_size=1, max_size=3).map(Cycling)


def options(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments, each one optional (left out: the default)."""
    return st.fixed_dictionaries({}, optional=strategies)


decay = st.floats(0.0, 1.0, exclude_max=True)
unit = st.floats(0.0, 1.0)
open_unit = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)
positive_eps = st.floats(1e-12, 1e-2)
learning_rate = hyper(st.floats(0.0, 1.0))
weight_decay = hyper(st.floats(0.0, 0.1))
palm_scale = st.floats(0.0, 10.0, exclude_min=True)
palm = st.builds(palm_beta2, palm_scale, st.booleans())
second_moment_decay = hyper(decay) | palm
# hyper learning rates (and AdaTune's alpha) well above these grow eta by beta <g, u> so fast
# on arbitrary gradients that a few steps overflow: divergence, not a defect
hyper_lr = st.floats(0.0, 0.01)
# > 0, and not below float32's range, where it would round to 0 (then 0/0 at a zero gradient)
max_norm = st.floats(torch.finfo(torch.float32).tiny, 1e3)
frequency = st.integers(1, 3) | st.builds(precond_schedule, st.floats(0.05, 1.0),
                                          st.floats(0.5, 10.0))
masks = (st.integers(0, 3).map(ByRank)
         | st.sampled_from([["*.weight", "0"], ["*"], ["*.bias", "1", "2"]])
         | st.just({"*.weight": True, "0": True, "*": False}))
labels = (st.integers(0, 3).map(lambda rank: ByRank(rank, "first", "second"))
          | st.just({"*.weight": "first", "0": "first", "*": "second"}))

MOMENTS = dict(b1=hyper(decay), b2=second_moment_decay, eps=positive_eps)
MECHANIC = dict(s_decay=st.floats(0.0, 1.0), betas=st.lists(open_unit, min_size=1, max_size=6)
                .map(tuple), s_init=st.floats(1e-12, 1.0), eps=positive_eps,
                store_delta=st.booleans(), variant=st.sampled_from(["optax", "pytorch"]))
SOAP = dict(shampoo_beta=st.none() | decay, eps=positive_eps, max_precond_dim=st.integers(1, 64),
            merge_dims=st.booleans(), precondition_1d=st.booleans(),
            normalize_grads=st.booleans(), warmup_steps=st.integers(0, 3))
SCHEDULE_FREE = dict(r=st.floats(0.0, 2.0), weight_lr_power=st.floats(0.0, 4.0))
PALM = dict(beta2_scale=palm_scale, heavyball_debias=st.booleans())
SCHEDULER = dict(precond_scheduler=st.tuples(st.floats(0.05, 1.0), st.floats(0.5, 10.0)))


@st.composite
def hypergrad_options(draw: st.DrawFn, mode: str | None = None, discount: bool = True
                      ) -> dict[str, Any]:
    """``hypergrad_lr``'s arguments (with ``mode`` when it is not given; ``mu`` and
    ``first_order`` only with ``discount``), the learning rate as ``init_lr``. Options of another
    mode or dynamics stay at their defaults, as required."""
    init_lr = draw(st.floats(1e-4, 1.0))
    chosen = mode or draw(st.sampled_from(["hd", "marthe"]))
    drawn = {"init_lr": init_lr, "hyper_lr": draw(hyper_lr), **draw(options(
        alpha=hyper_lr, weight_decay=st.floats(0.0, 0.1),
        grad_clip=st.none() | st.floats(0.1, 100.0),
        min_lr=st.floats(1e-3, 1.0).map(lambda fraction: fraction * init_lr)))}
    if mode is None:
        drawn["mode"] = chosen
    if chosen == "marthe":
        dynamics = draw(st.sampled_from(["sgd", "sgd_momentum", "adam"]))
        drawn["dynamics"] = dynamics
        drawn |= draw(options(lr_in_jacobian=st.sampled_from(["current", "initial"])))
        if discount:
            drawn |= draw(options(mu=st.just("auto") | st.floats(-1.0, 1.0, exclude_min=True),
                                  first_order=st.booleans()))
        if dynamics == "sgd_momentum":
            drawn |= draw(options(momentum=open_unit, nesterov=st.booleans()))
        if dynamics == "adam":
            drawn |= draw(options(b1=decay, b2=decay, eps=positive_eps))
        if drawn.get("grad_clip"):
            drawn |= draw(options(clip_training_grad=st.booleans()))
    return drawn


# ---------------------------------------------------------------------------------------------
# Cases: every public transform, combinator and recipe


class Case(NamedTuple):
    """How to build a transform from drawn keyword arguments, and what else it exercises."""

    build: Callable[..., GradientTransformation]
    hyperparameters: st.SearchStrategy[dict[str, Any]]
    exports: tuple[str, ...]  # the public names a run of this case exercises
    chained: bool = False  # an outermost chain: it adds the grads extra itself
    check_state: StateCheck | None = None


class Member(NamedTuple):
    """A drawn member of a combinator: a case and its keyword arguments."""

    case: str
    hyperparameters: dict[str, Any]

    def build(self) -> GradientTransformation:
        return CASES[self.case].build(**self.hyperparameters)


def members(names: tuple[str, ...]) -> st.SearchStrategy[Member]:
    return st.sampled_from(names).flatmap(
        lambda name: st.builds(Member, st.just(name), CASES[name].hyperparameters))


def single(build: Callable[..., GradientTransformation],
           required: dict[str, st.SearchStrategy[Any]] | None = None,
           **strategies: st.SearchStrategy[Any]) -> Case:
    """A case of one factory: its ``required`` keyword arguments, and optional others."""
    return Case(build, st.fixed_dictionaries(required or {}, optional=strategies),
                (build.__name__,))


def recipe(build: Callable[..., GradientTransformation], check_state: StateCheck | None = None,
           **strategies: st.SearchStrategy[Any]) -> Case:
    return Case(build, options(**strategies), (build.__name__,), chained=True,
                check_state=check_state)


def schedule_free_case(base: str, learning_rate: Any, weight_decay: float = 0.0,
                       **kwargs: Any) -> GradientTransformation:
    """``schedule_free`` around one of a few bases that end with the same learning rate."""
    step = scale_by_learning_rate(learning_rate)
    inner = {"sgd": step,
             "sign": chain(scale_by_sign(), step),
             "rms": chain(scale_by_rms_inplace(), add_decayed_weights(weight_decay), step)}[base]
    return schedule_free(inner, learning_rate, **kwargs)


def palm_case(consumer: str, **kwargs: Any) -> GradientTransformation:
    """``palm_beta2`` as a chain member, setting the second-moment decay of the next one."""
    return chain(palm_beta2(**kwargs), CASES[consumer].build())


def momentum_if_nesterov(drawn: dict[str, Any]) -> bool:
    """Nesterov needs momentum (a schedule, or a number > 0)."""
    momentum = drawn.get("momentum", 0.0)
    return not drawn.get("nesterov") or callable(momentum) or momentum > 0


def inject_case(factory: str, **kwargs: Any) -> GradientTransformation:
    return inject_hyperparams(INJECTABLE[factory][0])(**kwargs)


def chain_case(members: list[Member], terminal: Member | None = None, named: bool = False
               ) -> GradientTransformation:
    built = [m.build() for m in members] + ([terminal.build()] if terminal else [])
    if named:
        return named_chain(*((f"m{i}", tx) for i, tx in enumerate(built)))
    return chain(*built)


INJECTABLE = {  # factory, strategies of its required and optional scheduled hyperparameters
    "scale_by_adam": (scale_by_adam, {}, dict(b1=hyper(decay), b2=hyper(decay),
                                              eps=hyper(positive_eps))),
    "clip_by_global_norm": (clip_by_global_norm, dict(max_norm=hyper(max_norm)), {}),
    # b1 = 0 keeps no momentum buffer from init on (documented): its schedules stay above 0
    "scale_by_sm3": (scale_by_sm3, {}, dict(
        b1=decay | st.lists(open_unit, min_size=1, max_size=3).map(Cycling),
        b2=hyper(st.floats(0.0, 1.0, exclude_min=True)))),
}

MEMBERS = ("identity", "scale", "scale_by_learning_rate", "scale_by_schedule",
           "add_decayed_weights", "scale_by_sign", "trace", "ema", "qh_momentum",
           "scale_by_adam", "scale_by_rms", "scale_by_adam_inplace", "scale_by_rms_inplace",
           "scale_by_laprop", "scale_by_adopt", "soap_precondition", "scale_by_sm3",
           "scale_by_abs_hessian_diag", "clip", "clip_by_global_norm", "clip_by_agc")
TERMINALS = ("schedule_free", "mechanic_scale", "hypergrad_lr")
SECOND_MOMENT_CONSUMERS = ("scale_by_adam", "scale_by_rms", "scale_by_adam_inplace",
                           "scale_by_rms_inplace", "scale_by_laprop", "scale_by_adopt",
                           "soap_precondition")

CASES: dict[str, Case] = {
    # transforms
    "identity": single(identity),
    "scale": single(scale, {"factor": st.floats(-1e3, 1e3)}),
    "scale_by_learning_rate": single(scale_by_learning_rate, {"learning_rate": learning_rate},
                                     flip_sign=st.booleans()),
    "scale_by_schedule": Case(scale_by_schedule, st.fixed_dictionaries(
        {"schedule": st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=3).map(Cycling)}),
        ("scale_by_schedule",)),
    "add_decayed_weights": single(add_decayed_weights, weight_decay=hyper(st.floats(0.0, 1.0)),
                                  mask=st.none() | masks),
    "scale_by_sign": single(scale_by_sign),
    "trace": single(trace, decay=hyper(decay), nesterov=st.booleans()),
    "ema": Case(ema, st.fixed_dictionaries({"decay": decay, "debias": st.just(True)})
                | st.fixed_dictionaries({"decay": hyper(decay), "debias": st.just(False)}),
                ("ema",)),
    "qh_momentum": single(qh_momentum, beta=decay, nu=st.none() | unit,
                          bias_correction=st.sampled_from(["esgd", "qhadam", "none"])),
    "scale_by_adam": single(scale_by_adam, **MOMENTS, eps_root=st.floats(0.0, 1e-2),
                            nesterov=st.booleans()),
    "scale_by_rms": single(scale_by_rms, decay=second_moment_decay, eps=positive_eps,
                           initial_scale=st.floats(0.0, 10.0), eps_in_sqrt=st.booleans(),
                           bias_correction=st.booleans()),
    "palm_beta2": Case(palm_case, st.fixed_dictionaries(
        {"consumer": st.sampled_from(SECOND_MOMENT_CONSUMERS)},
        optional=dict(scale=palm_scale, heavyball_debias=st.booleans())),
        ("palm_beta2",), chained=True),
    "scale_by_adam_inplace": single(scale_by_adam_inplace, **MOMENTS),
    "scale_by_rms_inplace": single(scale_by_rms_inplace, b2=second_moment_decay,
                                   eps=positive_eps),
    "scale_by_laprop": single(scale_by_laprop, **MOMENTS),
    "scale_by_adopt": single(scale_by_adopt, **MOMENTS, clip=st.none() | st.booleans(),
                             style=st.sampled_from(["heavyball", "paper"])),
    "soap_precondition": single(
        soap_precondition, b1=hyper(decay), b2=second_moment_decay,
        **{k: v for k, v in SOAP.items() if k != "warmup_steps"},
        eps_mode=st.sampled_from(["max", "add"]), debias=st.sampled_from(["inplace", "adam"]),
        precondition_frequency=frequency, merge_rule=st.sampled_from(["heavyball", "original"]),
        strict=st.booleans()),
    "schedule_free": Case(schedule_free_case, st.fixed_dictionaries(
        {"base": st.sampled_from(["sgd", "sign", "rms"]), "learning_rate": learning_rate},
        optional=dict(weight_decay=st.floats(0.0, 0.1), b1=decay,
                      weighting=st.sampled_from(["current", "max"]), **SCHEDULE_FREE)),
        ("schedule_free", "schedule_free_eval_params", "to_eval", "to_train"),
        check_state=check_evaluation_point),
    "mechanic_scale": Case(mechanic_scale, options(**MECHANIC),
                           ("mechanic_scale", "mechanic_scale_value"),
                           check_state=check_mechanic_scale),
    "hypergrad_lr": Case(hypergrad_lr, hypergrad_options(), ("hypergrad_lr", "hypergrad_lr_value"),
                         check_state=check_learning_rate),
    "scale_by_sm3": single(scale_by_sm3, b1=decay, b2=st.floats(0.0, 1.0, exclude_min=True),
                           eps=st.just(0.0) | st.floats(0.0, 1e-2),
                           ema_accumulator_rule=st.sampled_from(["assign", "running_max"])),
    "scale_by_abs_hessian_diag": single(
        scale_by_abs_hessian_diag, b2=decay, eps=st.floats(1e-12, 1.0),
        update_d_every=st.integers(1, 3), d_warmup=st.integers(1, 3),
        bias_correction=st.booleans(), seed=st.integers(0, 2 ** 31)),
    "clip": single(clip, {"max_delta": st.floats(0.0, 1e3, exclude_min=True)}),
    "clip_by_global_norm": single(clip_by_global_norm, {"max_norm": max_norm}),
    "clip_by_agc": single(clip_by_agc, clip=st.floats(-1.0, 1.0),
                          min_param_norm=st.floats(0.0, 1.0), eps=st.floats(0.0, 1e-2)),
    # combinators
    "chain": Case(chain_case, st.fixed_dictionaries(
        {"members": st.lists(members(MEMBERS), max_size=3)},
        optional={"terminal": members(TERMINALS)}), ("chain",), chained=True),
    "named_chain": Case(chain_case, st.fixed_dictionaries(
        {"members": st.lists(members(MEMBERS), max_size=3), "named": st.just(True)},
        optional={"terminal": members(TERMINALS)}), ("named_chain",), chained=True),
    "masked": Case(lambda inner, mask: masked(inner.build(), mask), st.fixed_dictionaries(
        {"inner": members(MEMBERS + TERMINALS), "mask": masks}), ("masked",)),
    "partition": Case(lambda first, second, labels: partition(
        {"first": first.build(), "second": second.build()}, labels), st.fixed_dictionaries(
        {"first": members(MEMBERS + TERMINALS), "second": members(MEMBERS), "labels": labels}),
        ("partition",)),
    "freeze": Case(freeze, st.fixed_dictionaries({"mask": masks}), ("freeze",)),
    "inject_hyperparams": Case(inject_case, st.sampled_from(sorted(INJECTABLE)).flatmap(
        lambda factory: st.fixed_dictionaries({"factory": st.just(factory),
                                               **INJECTABLE[factory][1]},
                                              optional=INJECTABLE[factory][2])),
        ("inject_hyperparams",)),
    "multi_steps": Case(lambda inner, every_k: multi_steps(inner.build(), every_k),
                        st.fixed_dictionaries({"inner": members(MEMBERS + TERMINALS),
                                               "every_k": st.integers(1, 3)}), ("multi_steps",)),
    "apply_if_finite": Case(
        lambda inner, **kwargs: apply_if_finite(inner.build(), **kwargs), st.fixed_dictionaries(
            {"inner": members(MEMBERS + TERMINALS)},
            optional={"max_consecutive_skips": st.integers(0, 3)}), ("apply_if_finite",)),
    # recipes
    "sgd": Case(sgd, options(learning_rate=learning_rate, momentum=hyper(decay),
                             nesterov=st.booleans(), weight_decay=weight_decay)
                .filter(momentum_if_nesterov), ("sgd",), chained=True),
    "adam": recipe(adam, learning_rate=learning_rate, b1=decay, b2=decay, eps=positive_eps,
                   weight_decay=weight_decay),
    "adamw": recipe(adamw, learning_rate=learning_rate, b1=decay, b2=decay, eps=positive_eps,
                    weight_decay=weight_decay, mask=st.none() | masks),
    "sm3": recipe(sm3, learning_rate=learning_rate, momentum=decay,
                  b2=st.floats(0.0, 1.0, exclude_min=True), eps=st.floats(0.0, 1e-2),
                  warmup_steps=st.none() | st.integers(0, 3),
                  total_steps=st.none() | st.integers(3, 10), power=st.floats(0.1, 4.0),
                  cooldown_fraction=st.floats(0.0, 1.0, exclude_min=True)),
    "esgd_m": recipe(esgd_m, learning_rate=learning_rate, betas=st.tuples(decay, decay),
                     v=st.none() | unit, lr_warmup=decay, eps=st.floats(1e-12, 1.0),
                     weight_decay=weight_decay, update_d_every=st.integers(1, 3),
                     d_warmup=st.integers(1, 3)),
    "adamw_inplace": recipe(adamw_inplace, learning_rate=learning_rate, **MOMENTS,
                            weight_decay=weight_decay, warmup_steps=st.integers(0, 3)),
    "laprop": recipe(laprop, learning_rate=learning_rate, **MOMENTS, weight_decay=weight_decay,
                     warmup_steps=st.integers(0, 3)),
    "adopt": recipe(adopt, learning_rate=learning_rate, **MOMENTS, weight_decay=weight_decay,
                    warmup_steps=st.integers(0, 3)),
    "sfadamw": recipe(sfadamw, check_evaluation_point, learning_rate=learning_rate, b1=decay,
                      b2=second_moment_decay, eps=positive_eps, weight_decay=weight_decay,
                      warmup_steps=st.integers(0, 3), **SCHEDULE_FREE),
    "palm_sfadamw": recipe(palm_sfadamw, check_evaluation_point, learning_rate=learning_rate,
                           b1=decay, eps=positive_eps, weight_decay=weight_decay,
                           warmup_steps=st.integers(0, 3), **SCHEDULE_FREE, **PALM),
    "soap": recipe(soap, learning_rate=learning_rate, b1=hyper(decay), b2=second_moment_decay,
                   weight_decay=weight_decay, precondition_frequency=frequency, **SOAP),
    "palm_soap": recipe(palm_soap, learning_rate=learning_rate, b1=hyper(decay),
                        weight_decay=weight_decay, precondition_frequency=frequency, **SOAP,
                        **PALM),
    "precond_schedule_soap": recipe(precond_schedule_soap, learning_rate=learning_rate,
                                    b1=hyper(decay), b2=second_moment_decay,
                                    weight_decay=weight_decay, **SOAP, **SCHEDULER),
    "precond_schedule_palm_soap": recipe(precond_schedule_palm_soap,
                                         learning_rate=learning_rate, b1=hyper(decay),
                                         weight_decay=weight_decay, **SOAP, **SCHEDULER, **PALM),
    "sf_palm_soap": recipe(sf_palm_soap, check_evaluation_point, learning_rate=learning_rate,
                           b1=decay, weight_decay=weight_decay, precondition_frequency=frequency,
                           gradient_clip_val=st.floats(-1.0, 1.0), **SCHEDULE_FREE, **PALM,
                           **{k: v for k, v in SOAP.items() if k != "shampoo_beta"}),
    "precond_schedule_sf_palm_soap": recipe(
        precond_schedule_sf_palm_soap, check_evaluation_point, learning_rate=learning_rate,
        b1=decay, weight_decay=weight_decay, gradient_clip_val=st.floats(-1.0, 1.0),
        **SCHEDULE_FREE, **PALM, **SCHEDULER,
        **{k: v for k, v in SOAP.items() if k != "shampoo_beta"}),
    "hd_sgd": Case(hd_sgd, st.fixed_dictionaries(
        {"learning_rate": st.floats(1e-4, 1.0)},
        optional=dict(hyper_lr=hyper_lr, weight_decay=st.floats(0.0, 0.1),
                      momentum=decay, nesterov=st.booleans())).filter(momentum_if_nesterov),
        ("hd_sgd",), chained=True, check_state=check_learning_rate),
    "hd_adam": Case(hd_adam, options(learning_rate=st.floats(1e-4, 1.0),
                                     hyper_lr=hyper_lr, b1=decay, b2=decay,
                                     eps=positive_eps, weight_decay=st.floats(0.0, 0.1)),
                    ("hd_adam",), chained=True, check_state=check_learning_rate),
    "marthe": Case(lambda init_lr, **kwargs: marthe(init_lr, **kwargs),
                   hypergrad_options("marthe"), ("marthe",), chained=True,
                   check_state=check_learning_rate),
    "rtho": Case(lambda init_lr, **kwargs: rtho(init_lr, **kwargs),
                 hypergrad_options("marthe", discount=False), ("rtho",), chained=True,
                 check_state=check_learning_rate),
    "mechanize": Case(lambda base, **kwargs: mechanize(base.build(), **kwargs),
                      st.fixed_dictionaries({"base": members(MEMBERS)}, optional=MECHANIC),
                      ("mechanize",), chained=True, check_state=check_mechanic_scale),
    "mechanize_recipe": Case(
        lambda base, learning_rate, **kwargs: mechanize({"sgd": sgd, "adamw": adamw}[base],
                                                        **kwargs)(learning_rate=learning_rate),
        st.fixed_dictionaries({"base": st.sampled_from(["sgd", "adamw"]),
                               "learning_rate": st.floats(0.0, 1.0)}, optional=MECHANIC),
        ("mechanize",), chained=True, check_state=check_mechanic_scale),
}


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", list(CASES))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_transform_keeps_its_properties_over_shapes_dtypes_and_hyperparameters(
        name: str, data: st.DataObject) -> None:
    case = CASES[name]
    hyperparameters = data.draw(case.hyperparameters, label="hyperparameters")
    problem = data.draw(problems(), label="problem")
    check_properties(case.build(**hyperparameters), problem, case.chained, case.check_state,
                     hyperparameters)


def test_every_public_transform_and_recipe_has_a_property_case() -> None:
    covered = {export for case in CASES.values() for export in case.exports}
    assert set(transforms.__all__) | set(chains.__all__) <= covered, \
        sorted(set(transforms.__all__) | set(chains.__all__) - covered)


# ---------------------------------------------------------------------------------------------
# The properties can fail: transforms that break each of them are caught


def fixed_problem() -> Problem:
    """Two steps on a matrix, a vector and a 0-d leaf, with exact zeros in the first gradient."""
    gen = torch.Generator().manual_seed(0)

    def tree(pattern: str) -> Tree:
        return {name: random_tensor(gen, shape, pattern, 1.0, torch.float32)
                for name, shape in zip(LEAF_NAMES, [(3, 4), (5,), ()])}

    return Problem(tree("normal"), [tree("half_zeros"), tree("normal")],
                   [tree("normal"), tree("normal")], 1.0)


def leafwise(init: Callable[[list[Tensor]], Any],
             update: Callable[[list[Tensor], Any], tuple[list[Tensor], Any]]
             ) -> GradientTransformation:
    """A transform from functions of the leaves."""

    def update_tree(updates: Tree, state: Any, params: Tree | None = None, **extras: Any):
        out, state = update(leaves(updates), state)
        return as_tree(updates, out), state

    return GradientTransformation(lambda params: init(leaves(params)), update_tree)


def copies(u: list[Tensor]) -> list[Tensor]:
    return [x.clone() for x in u]


def buffers(params: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) for p in params]


BROKEN = {  # a broken transform, and what the failure says
    "init writes the parameters": (leafwise(lambda p: torch._foreach_mul_(p, 2.0),
                                            lambda u, s: (copies(u), s)), "init changed"),
    "update writes the gradients": (leafwise(buffers, lambda u, s: (u, torch._foreach_mul_(u, 2.0)
                                                                    or s)), "call 1 changed"),
    "0/0 at a zero gradient": (leafwise(buffers, lambda u, s: ([x / x for x in u], s)),
                               "not finite"),
    "float64 updates": (leafwise(buffers, lambda u, s: ([x.double() for x in u], s)), "dtype"),
    "flattened updates": (leafwise(buffers, lambda u, s: ([x.reshape(-1) for x in u], s)),
                          "shape"),
    "a list for a dict": (GradientTransformation(lambda params: (), lambda u, s, p=None, **e:
                                                 (copies(leaves(u)), s)), "a list for a dict"),
    "a state that grows": (leafwise(lambda p: [], lambda u, s: (copies(u), s + [torch.zeros(1)])),
                           "state's structure"),
    "state dtype drift": (leafwise(buffers, lambda u, s: (copies(u), [b.double() for b in s])),
                          "state's structure"),
    "state shape drift": (leafwise(buffers, lambda u, s: (copies(u),
                                                          [torch.zeros(b.numel() + 1) for b in s])),
                          "state's structure"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_the_properties_catch_a_broken_transform(name: str) -> None:
    tx, message = BROKEN[name]
    with pytest.raises(AssertionError, match=message):
        check_properties(tx, fixed_problem())


def test_a_sound_transform_passes_the_problem_the_broken_ones_fail() -> None:
    check_properties(leafwise(buffers, lambda u, s: (copies(u), s)), fixed_problem())


# ---------------------------------------------------------------------------------------------
# Regressions: defects these properties found, on the smallest problems that showed them


def test_mechanic_never_scales_the_raw_gradient_in_place() -> None:
    # its updates were a detached alias of the raw gradient, so writable() did not copy them
    tx, params, grads = mechanic_scale(), [torch.ones(1)], [torch.tensor([-0.2934])]
    out, _ = tx.update(grads, tx.init(params), params, grads=grads)
    assert grads[0].item() == pytest.approx(-0.2934) and out[0].item() != grads[0].item()
    check_properties(chain(identity(), mechanic_scale()), fixed_problem(), chained=True)


def test_mechanic_store_delta_keeps_a_0d_float32_parameter_float32_beside_a_float64_one(
        ) -> None:
    # S is float64 when a parameter is; a 0-d float32 Delta times a 0-d S became float64
    tx = mechanic_scale(store_delta=True)
    params = [torch.tensor(1.5), torch.tensor(-0.3, dtype=torch.float64)]
    grads = [torch.tensor(-2.2), torch.tensor(0.6, dtype=torch.float64)]
    out, _ = tx.update(grads, tx.init(params), params, grads=grads)
    assert [o.dtype for o in out] == [torch.float32, torch.float64]


def test_agc_with_eps_zero_keeps_a_zero_update_of_a_zero_parameter_zero() -> None:
    # s = c max(|x|, m) / max(|u|, eps) was 0/0 for x = u = 0, m = eps = 0 (or c x underflowing)
    for clip_factor, min_param_norm, param in [(0.1, 0.0, 0.0), (4e-128, 1e-3, 1.5)]:
        tx = clip_by_agc(clip_factor, min_param_norm=min_param_norm, eps=0.0)
        params = [torch.full((2,), param)]
        out, _ = tx.update([torch.zeros(2)], tx.init(params), params)
        assert torch.equal(out[0], torch.zeros(2))
