"""``ChainOptimizer``: any transform or recipe as a real ``torch.optim.Optimizer``."""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from types import CodeType, EllipsisType, FunctionType
from typing import Any

import torch
from torch import Tensor
from typing_extensions import TypedDict

from gradchain.core import (
    GradientTransformation,
    _caller_stacklevel,
    add_scaled_,
    all_finite,
    apply_updates,
    check_non_negative,
    flatten_state,
    leaves,
    merge_states,
    needs_hvp,
    resolve,
    select_state,
    unflatten_state,
)
from gradchain.distributed import (
    check_gradient_layout,
    is_dtensor,
    local_shard,
    refusing_data_parallel,
)

__all__ = ["ChainOptimizer", "AdapterOptions"]

Recipe = Callable[..., GradientTransformation]


class AdapterOptions(TypedDict, total=False):
    """How a ``ChainOptimizer`` runs its chain; every named optimizer takes these keywords.

    ``compile``: run each group's update through ``torch.compile``. ``foreach``: None picks
    per device (on CPU, cache-sized pieces of the group), True runs the whole group in one
    piece, False one parameter at a time; all three give the same numbers. ``skip_nonfinite``:
    skip a step whose gradients hold a NaN or an infinity, leaving parameters and state as they
    were. ``stochastic_rounding`` and ``rounding_seed``: how bfloat16 parameters are written.
    Defaults: compile False, foreach None, skip_nonfinite False, stochastic_rounding False
    (True for the HeavyBall family), rounding_seed 0.

    Example:
        >>> import warnings
        >>> from gradchain.optimizers import AdamW
        >>> options: AdapterOptions = {"foreach": False, "skip_nonfinite": True}
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = AdamW([p], lr=1e-3, **options)
        >>> p.grad = torch.tensor([float("nan"), 1.0])
        >>> with warnings.catch_warnings(record=True):  # a RuntimeWarning says it skipped
        ...     warnings.simplefilter("always")
        ...     opt.step()
        >>> opt.skipped_steps, p.tolist()
        (1, [0.0, 0.0])
    """

    compile: bool
    foreach: bool | None
    skip_nonfinite: bool
    stochastic_rounding: bool
    rounding_seed: int

#: On CPU, a leafwise chain runs over parameters in pieces, each applied while its tensors are
#: still in cache (torch's CPU foreach ops run one tensor at a time, so a whole-list pass per op
#: streams every buffer through memory once per op). A piece spans about this many elements
#: summed over the parameter-sized tensors it touches: the parameters, their gradients and
#: their parameter-sized state (2^19 parameter elements for AdamW's four tensors, 2^20 for
#: SM3's two; measured at 2 threads, where smaller pieces cost more Python per element and
#: larger ones lose the cache). Elementwise chains also split large parameters into blocks of
#: rows of that size.
CHUNK_ELEMENTS = 1 << 21

#: Inductor's options for the compiled step: every parameter's update in a loop of its own on
#: CPU. By default inductor merges the loops over up to 16 tensors of one size into one, which
#: measured 5-16% slower for the in-place Adam family, ADOPT, schedule-free AdamW and SM3 on the
#: 27.3M-parameter benchmark at 2 threads (more memory streams per loop) and within noise for
#: SGD and AdamW. GPU code generation does not read it.
COMPILE_OPTIONS = {"cpp.max_horizontal_fusion_size": 1}

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _recipe_arguments(recipe: Recipe) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(recipe).parameters
    for name, p in parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"a recipe takes named hyperparameters only; {recipe.__name__} "
                            f"has {p}")
    return dict(parameters)


def _group_key(argument: str) -> str:
    """Recipes call the learning rate ``learning_rate``; param groups call it ``lr``."""
    return "lr" if argument == "learning_rate" else argument


class ChainOptimizer(torch.optim.Optimizer):
    """A gradient transformation (or a recipe) driving ``torch.optim``'s machinery.

    ``transform`` is either a ``GradientTransformation`` (fixed hyperparameters) or a *recipe*,
    a function of keyword hyperparameters returning one (``gradchain.chains.adamw``). With a
    recipe, its hyperparameters live in ``param_groups`` (the recipe's ``learning_rate`` is the
    group's ``"lr"``), every group may set its own, the transform is rebuilt from the group's
    current values when they change (so ``torch.optim.lr_scheduler`` works unmodified), and a
    hyperparameter may also be a schedule ``f(step)``, evaluated at the group's step count
    without being written back. Invalid hyperparameters raise ``ValueError`` at construction and
    in ``add_param_group``.

    ``step(closure=None)`` skips parameters whose ``.grad`` is None (as torch does) and passes
    the chain the ``loss`` (when a closure is given) and ``step`` extras; ``param_extras`` adds
    extras shaped like the parameters (a validation gradient: ``val_grads``). Gradients of 16-bit
    parameters are widened to float32; the state of such parameters is float32. The state
    lives in one state per group; ``state_dict()`` flattens it to torch's per-parameter layout,
    with keys from the chain (``"adam.mu"``, ``"step"``), loadable with
    ``torch.load(weights_only=True)``. ``optimizer.state[p]`` shows the same view.

    ``stochastic_rounding=True`` writes bfloat16 parameters with stochastic rounding
    (``core.stochastic_round_``): the update is computed in float32, added in float32 and
    rounded once, unbiasedly, drawing from a dedicated generator per device (seeded with
    ``rounding_seed``, saved in ``state_dict()["rounding"]``), so the global random stream is
    untouched and a resumed run rounds as the uninterrupted one would. Other dtypes are
    unaffected.

    ``compile=True`` runs each group's update and its application through ``torch.compile``
    (one fused graph per group; with stochastic rounding, the rounding runs after it); eager
    mode is the reference. The learning rate then enters the graph as a tensor, so an LR
    scheduler (or a learning-rate schedule) changes it without recompiling; a change of any
    other hyperparameter rebuilds the chain and compiles it again.

    ``foreach=None`` (the default) runs a leafwise chain in eager mode on CPU over a few
    parameters at a time, while they are hot in cache (large parameters of an elementwise chain
    as blocks of rows), and elsewhere over the whole group at once; ``foreach=True`` always
    takes the whole group, ``foreach=False`` one parameter at a time (chains that are not
    leafwise, e.g. a global-norm clip, always see the whole group). All give the same numbers.

    ``skip_nonfinite=True`` checks the gradients before anything moves (one host
    synchronisation per step): when one holds a NaN or an infinity, the step is skipped with a
    ``RuntimeWarning`` (parameters, state and step counts unchanged, like
    ``chains.apply_if_finite`` and ``torch.amp.GradScaler``) and counted in
    ``skipped_steps``. Without it, a non-finite gradient goes into the chain, as in
    ``torch.optim``: element-wise recipes write NaN into the parameters it touches.

    Example:
        >>> from gradchain.chains import adamw
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ChainOptimizer(model.parameters(), adamw, lr=1e-3, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward(); opt.step()
    """

    def __init__(self, params: Iterable[Any], transform: GradientTransformation | Recipe, *,
                 compile: bool = False, foreach: bool | None = None,
                 skip_nonfinite: bool = False, stochastic_rounding: bool = False,
                 rounding_seed: int = 0, **hyperparameters: Any) -> None:
        if isinstance(transform, GradientTransformation):
            if hyperparameters:
                raise ValueError(
                    f"hyperparameters {sorted(hyperparameters)} need a recipe (a function "
                    "returning the transform), not a built transform")
            self._recipe: Recipe | None = None
            self._fixed: GradientTransformation | None = transform
            self._arguments: dict[str, str] = {}
            self._schedulable: set[str] = set()
            defaults: dict[str, Any] = {}
        elif callable(transform):
            self._recipe, self._fixed = transform, None
            arguments = _recipe_arguments(transform)
            self._arguments = {_group_key(a): a for a in arguments}
            self._schedulable = {_group_key(a) for a, p in arguments.items()
                                 if p.default is inspect.Parameter.empty or _is_number(p.default)}
            unknown = set(hyperparameters) - set(self._arguments)
            if unknown:
                raise ValueError(f"unknown hyperparameters {sorted(unknown)} for "
                                 f"{transform.__name__}; it takes {sorted(self._arguments)}")
            defaults = {key: p.default for key, p in
                        ((_group_key(a), p) for a, p in arguments.items())
                        if p.default is not inspect.Parameter.empty}
            defaults.update(hyperparameters)
        else:
            raise TypeError(f"transform must be a GradientTransformation or a recipe, "
                            f"got {type(transform).__name__}")
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        self._compile = compile
        self._foreach = foreach
        self._skip_nonfinite = bool(skip_nonfinite)
        #: Steps skipped for non-finite gradients (``skip_nonfinite=True``).
        self.skipped_steps = 0
        #: With ``compile=True``: one 0-d tensor per group holding its learning rate, read by
        #: the compiled chain; None where the recipe takes no learning-rate schedule.
        self._lr_tensors: list[Tensor | None] = []
        self._rate_schedule: bool | None = None
        self._stochastic_rounding = bool(stochastic_rounding)
        self._rounding_seed = int(rounding_seed)
        self._rounding: dict[str, torch.Generator] = {}
        self._group_states: list[Any] = []
        self._group_steps: list[int] = []
        self._built: list[tuple[Any, GradientTransformation, Callable | None] | None] = []
        self._recompiles: dict[int, int] = {}  # per group: rebuilds of its compiled chain
        self._step_code: CodeType | None = None  # the code its compiled steps run (_own_step)
        super().__init__(params, defaults)
        # every parameter has an entry from the start, so torch.distributed.checkpoint reads
        # state_dict() (which holds the initial state) instead of creating the state with a
        # zero-gradient, zero-lr step (which would count as a step, or fail for some recipes)
        self._refresh_state_view()

    # ------------------------------------------------------------------------------------------
    # Groups and transforms

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics); its hyperparameters are validated first."""
        group = dict(param_group)
        if self._recipe is not None:
            missing = [k for k in self._arguments if k not in group and k not in self.defaults]
            if missing:
                raise ValueError(f"missing hyperparameters {missing} for "
                                 f"{self._recipe.__name__}")
            unknown = set(group) - set(self._arguments) - {"params", "param_names"}
            if unknown:
                raise ValueError(f"unknown hyperparameters {sorted(unknown)} for "
                                 f"{self._recipe.__name__}; it takes {sorted(self._arguments)}")
            self._build(self._hyperparameters({**self.defaults, **group}, 0))
        params = group["params"]
        if not isinstance(params, (Tensor, set)):  # read once: it may be a generator
            params = group["params"] = list(params)
        for p in [params] if isinstance(params, Tensor) else list(params):
            tensor = p[1] if isinstance(p, tuple) else p
            if isinstance(tensor, Tensor) and tensor.is_complex():
                raise ValueError("complex parameters are not supported; optimize "
                                 "torch.view_as_real(param) instead")
        super().add_param_group(group)
        self._group_states.append(None)
        self._group_steps.append(0)
        self._built.append(None)
        self._lr_tensors.append(None)

    def _hyperparameters(self, group: dict[str, Any], step: int) -> dict[str, Any]:
        return {argument: _value(group[key], step) if key in self._schedulable else group[key]
                for key, argument in self._arguments.items()}

    def _build(self, hyperparameters: dict[str, Any]) -> GradientTransformation:
        """The fixed transform, or the recipe built from ``hyperparameters``."""
        if self._fixed is not None:
            return self._fixed
        assert self._recipe is not None
        return self._recipe(**hyperparameters)

    def _transform(self, index: int) -> tuple[GradientTransformation, Callable | None]:
        """The group's transform (and compiled step), rebuilt only when its hyperparameters
        changed; a compiled chain reads the learning rate from the group's tensor instead."""
        group, step = self.param_groups[index], self._group_steps[index]
        hyperparameters = self._hyperparameters(group, step) if self._recipe else {}
        rate = self._arguments.get("lr")  # the recipe's name for it
        tensor_lr = self._compile and rate is not None and \
            self._lr_as_tensor(index, hyperparameters[rate])
        if tensor_lr:
            del hyperparameters[rate]
        key = tuple(hyperparameters.items()) if self._recipe else None
        cached = self._built[index]
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        if cached is not None and self._compile:
            self._note_recompile(index, dict(cached[0] or ()), hyperparameters)
        lr = self._lr_tensors[index]
        tx = self._build({**hyperparameters, rate: lambda count: lr} if tensor_lr
                         else hyperparameters)
        compiled = torch.compile(self._own_step(_make_step(tx, not self._rounds(group))),
                                 options=COMPILE_OPTIONS) if self._compile else None
        self._built[index] = (key, tx, compiled)
        return tx, compiled

    def _own_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """``step`` running this optimizer's own copy of its code. Dynamo keeps its compiled
        graphs, and counts them against ``torch._dynamo.config.recompile_limit`` (8), per code
        object: with one code for every optimizer, the chains compiled after the first few in a
        process (a notebook's ablations) would run eagerly. The groups of one optimizer share its
        copy, so groups that differ only in their learning rates share one graph."""
        code = self.__dict__.get("_step_code")  # absent in optimizers pickled before it
        if code is None:
            code = self._step_code = step.__code__.replace()
        return FunctionType(code, step.__globals__, step.__name__, step.__defaults__,
                            step.__closure__)

    def _note_recompile(self, index: int, before: dict[str, Any], now: dict[str, Any]) -> None:
        """Warns once, at the second rebuild of a group's compiled chain (each compiles the step
        anew); a single change of the hyperparameters of every group is not warned about."""
        count = self._recompiles[index] = self._recompiles.get(index, 0) + 1
        if count != 2 or sum(c >= 2 for c in self._recompiles.values()) > 1:
            return
        names = {argument: key for key, argument in self._arguments.items()}
        changed = sorted(names.get(a, a) for a in now if before.get(a) != now[a])
        warnings.warn(f"compile=True: hyperparameters {changed} changed again, and each change "
                      "compiles the step anew (only the learning rate is a tensor in the "
                      "graph). A scheduler that cycles momentum (OneCycleLR or CyclicLR with "
                      "cycle_momentum=True) changes them at every step: turn that off, or use "
                      "compile=False", UserWarning, stacklevel=_caller_stacklevel())

    def _lr_as_tensor(self, index: int, learning_rate: Any) -> bool:
        """Whether the group's compiled chain reads its learning rate from a tensor (then set
        to ``learning_rate``): it does when the recipe takes a schedule there."""
        if not _is_number(learning_rate) or not self._takes_rate_schedule():
            return False
        check_non_negative("lr", learning_rate)  # as the recipe would check a number
        lr = self._lr_tensors[index]
        if lr is None:
            device = next((p.device for p in self.param_groups[index]["params"]),
                          torch.device("cpu"))
            lr = self._lr_tensors[index] = torch.zeros((), dtype=torch.float64, device=device)
        lr.fill_(float(learning_rate))
        return True

    def _takes_rate_schedule(self) -> bool:
        """Whether the recipe accepts a schedule as its learning rate (tried once, on a build
        with the first group's hyperparameters)."""
        if self._rate_schedule is None:
            hyperparameters = self._hyperparameters(self.param_groups[0], 0)
            name = self._arguments["lr"]
            value = float(hyperparameters[name])
            try:
                assert self._recipe is not None
                self._recipe(**{**hyperparameters, name: lambda count: value})
                self._rate_schedule = True
            except (TypeError, ValueError):  # the recipe takes a number only
                self._rate_schedule = False
        return self._rate_schedule

    @staticmethod
    def _names(group: dict[str, Any]) -> list[str]:
        return list(group.get("param_names") or map(str, range(len(group["params"]))))

    # ------------------------------------------------------------------------------------------
    # Step

    def _init_group(self, index: int, tx: GradientTransformation) -> Any:
        group = self.param_groups[index]
        return tx.init(dict(zip(self._names(group), group["params"])))

    def needs_hvp(self) -> bool:
        """Whether the next ``step`` uses Hessian-vector products in some parameter group.

        On such steps, call ``loss.backward(create_graph=True)`` before ``step()``, or pass a
        closure to ``step`` and let the optimizer run it with the graph.
        """
        return any(self._group_needs_hvp(i) for i in range(len(self.param_groups)))

    def _group_needs_hvp(self, index: int, tx: GradientTransformation | None = None) -> bool:
        tx = tx or self._transform(index)[0]
        if tx.needs_hvp is None:
            return False
        state = self._group_states[index]
        return needs_hvp(tx, self._init_group(index, tx) if state is None else state)

    def step(self, closure: Callable[[], Any] | None = None, *,
             param_extras: Mapping[str, Sequence[Tensor | None]] | None = None) -> Any:
        """One optimization step over every group; returns the closure's loss, if any.

        On steps that use Hessian-vector products (``needs_hvp()``), the closure runs with its
        ``backward`` building the double-backward graph; that graph is released after the step.

        ``param_extras`` maps an extra's name to one tensor per parameter, in the order of
        ``param_groups`` (None reads as zeros), e.g. ``{"val_grads": [...]}``; each group's chain
        receives it as a dict ``name -> tensor`` over the parameters that have a gradient, as it
        receives ``grads``.
        """
        return self._step(closure, param_extras)

    @torch.compiler.disable
    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None,
              param_extras: Mapping[str, Sequence[Tensor | None]] | None) -> Any:
        """The body of ``step``. A subclass that extends ``step``'s signature calls this rather
        than ``super().step``, so that torch's step hooks (wrapped around every class's own
        ``step``) run once. It is kept out of ``torch.compile``: a compiled caller
        (``torch.compile(optimizer.step)``, a compiled training step) runs it as it is, between
        graphs; ``compile=True`` compiles the chain's own graph."""
        per_group = self._split_param_extras(param_extras or {})
        built = [self._transform(i) for i in range(len(self.param_groups))]
        curvature = [self._group_needs_hvp(i, tx) for i, (tx, _) in enumerate(built)]
        loss = None
        if closure is not None:
            with torch.enable_grad(), _backward_with_graph(any(curvature)):
                loss = closure()
            built = [self._transform(i) for i in range(len(self.param_groups))]
        try:
            for (tx, _), group in zip(built, self.param_groups):  # all before anything moves
                for name, p in zip(self._names(group), group["params"]):
                    if p.grad is not None:
                        _check_gradient(name, p, tx.accepts_sparse)
            if closure is None and any(curvature):
                _check_graph([p for group, needs in zip(self.param_groups, curvature) if needs
                              for p in group["params"] if p.grad is not None])
            if self._skip_nonfinite and not _finite_gradients(self.param_groups):
                self.skipped_steps += 1
                warnings.warn("a gradient holds NaN or infinity: optimizer step skipped, "
                              "parameters and state unchanged", RuntimeWarning,
                              stacklevel=_caller_stacklevel())
                return loss
            for index, group in enumerate(self.param_groups):
                self._step_group(index, group, built[index], loss, curvature[index],
                                 per_group[index])
        finally:
            _release_graphs(self.param_groups)
        self._refresh_state_view()
        return loss

    def _split_param_extras(self, param_extras: Mapping[str, Sequence[Tensor | None]]
                            ) -> list[dict[str, list[Tensor]]]:
        """``param_extras`` cut into one dict per group (None entries become zeros)."""
        sizes = [len(group["params"]) for group in self.param_groups]
        per_group: list[dict[str, list[Tensor]]] = [{} for _ in sizes]
        for key, values in param_extras.items():
            values = list(values)
            if len(values) != sum(sizes):
                raise ValueError(f"param_extras[{key!r}] has {len(values)} entries for "
                                 f"{sum(sizes)} parameters; give one tensor (or None) per "
                                 "parameter, in the order of param_groups")
            start = 0
            for index, (group, size) in enumerate(zip(self.param_groups, sizes)):
                chunk = values[start:start + size]
                per_group[index][key] = [torch.zeros_like(p) if v is None else v.detach()
                                         for p, v in zip(group["params"], chunk)]
                start += size
        return per_group

    def _step_group(self, group_index: int, group: dict[str, Any],
                    built: tuple[GradientTransformation, Callable | None], loss: Any,
                    curvature: bool, param_extras: dict[str, list[Tensor]]) -> None:
        params: list[Tensor] = group["params"]
        names = self._names(group)
        active = [i for i, p in enumerate(params) if p.grad is not None]
        if not active:
            return
        tx, compiled = built
        state = self._group_states[group_index]
        if state is None:
            state = self._init_group(group_index, tx)
        extras: dict[str, Any] = {"step": self._group_steps[group_index]}
        if loss is not None:
            extras["loss"] = loss
        if curvature:
            extras["hvp"] = _hvp([names[i] for i in active], [params[i] for i in active])
        pieces = _pieces(params, active, tx, self._foreach, state) if compiled is None \
            else [(active, None)]
        rounding = self._rounds(group)
        run = compiled or _make_step(tx, not rounding, lend=True)
        parts = []
        for index, rows in pieces:  # every piece starts from the state as it was before the step
            grads = {names[i]: _widen(_block(params[i].grad.detach(), rows)) for i in index}
            chunk_params = {names[i]: _block(params[i], rows) for i in index}
            whole = select_state(state, index)
            piece_extras = {**extras, **{key: {names[i]: _widen(_block(values[i], rows))
                                               for i in index}
                                         for key, values in param_extras.items()}}
            part = run(grads, whole if rows is None else _rows_of(whole, rows), chunk_params,
                       piece_extras)
            if rounding:
                updates, part = part
                self._apply_rounded(chunk_params, updates)
            # elementwise row blocks updated their parameter's state in place, through views:
            # only the group-wide values are new
            parts.append((part, index if rows is None else []))
        self._group_states[group_index] = merge_states(state, parts)
        self._group_steps[group_index] += 1

    def _rounds(self, group: dict[str, Any]) -> bool:
        """Whether the group's step ends with stochastic rounding (bfloat16 parameters)."""
        return self._stochastic_rounding and any(p.dtype == torch.bfloat16
                                                 for p in group["params"])

    def _apply_rounded(self, params: dict[str, Tensor], updates: dict[str, Tensor]) -> None:
        device = next(iter(params.values())).device
        generator = self._rounding.get(str(device))
        if generator is None:
            generator = torch.Generator(device).manual_seed(self._rounding_seed)
            self._rounding[str(device)] = generator
        apply_updates(params, updates, stochastic_rounding=True, generator=generator)

    # ------------------------------------------------------------------------------------------
    # State

    @property  # type: ignore[override]
    def state(self) -> defaultdict[Tensor, dict[str, Any]]:
        """torch's per-parameter view of the chains' state, ``optimizer.state[p]`` (the entries
        of ``state_dict()["state"]``, holding the live tensors), built when first read after a
        step or a load."""
        view = self.__dict__.get("_state_view")
        if view is None:
            view = defaultdict(dict)
            for index, group in enumerate(self.param_groups):
                for p, entry in zip(group["params"], self._flat_group(index)):
                    view[p] = entry
            self._state_view = view
        return view

    @state.setter
    def state(self, value: defaultdict[Tensor, dict[str, Any]]) -> None:
        self._state_view = value  # torch's __init__ assigns an empty one

    def _refresh_state_view(self) -> None:
        """``state`` is built again at its next read."""
        self._state_view = None

    def _flat_group(self, index: int, initial: bool = False) -> list[dict[str, Any]]:
        """The group's per-parameter entries; before its first step, empty ones, or with
        ``initial`` those of the initial state (``init``, step 0)."""
        state = self._group_states[index]
        params = self.param_groups[index]["params"]
        if state is None and initial:
            state = self._init_group(index, self._transform(index)[0])
        if state is None:
            return [{} for _ in params]
        per_param, shared = flatten_state(state, len(params))
        head = {"step": self._group_steps[index], **shared}
        return [{**head, **entry} for entry in per_param]

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {id: {key: value}}, "param_groups": [...]}``.

        Keys are ``"step"`` plus the chain's state paths (``"adam.mu"``, ``"adam.count"``);
        group-wide values are repeated in every parameter's entry, as torch does with ``step``.
        A group that has not stepped yet shows its initial state (step 0): a checkpoint
        template taken from a fresh optimizer (``torch.distributed.checkpoint``) then holds
        every tensor to load into. DTensor parameters (FSDP2) have DTensor state, sharded alike.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        packed_state: dict[int, dict[str, Any]] = {}
        packed_groups = []
        start = 0
        for index, group in enumerate(self.param_groups):
            ids = list(range(start, start + len(group["params"])))
            start += len(ids)
            packed_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                  "params": ids})
            packed_state.update(zip(ids, self._flat_group(index, initial=True)))
        state_dict: dict[str, Any] = {"state": packed_state, "param_groups": packed_groups}
        if self._rounding:
            state_dict["rounding"] = {device: generator.get_state()
                                      for device, generator in self._rounding.items()}
        if self.skipped_steps:
            state_dict["skipped_steps"] = self.skipped_steps
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; continuing gives the same trajectory as never stopping."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._rounding = {}
        for device, generator_state in state_dict.get("rounding", {}).items():
            self._rounding[device] = torch.Generator(device)
            self._rounding[device].set_state(generator_state.cpu())
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(saved_groups)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}")
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("a parameter group of the checkpoint has "
                                 f"{len(saved['params'])} parameters, this optimizer's has "
                                 f"{len(group['params'])}")
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            ids = saved.pop("params")
            group.update(saved)
            entries = [_saved_entry(state_dict["state"], i) for i in ids]
            if all(e is None for e in entries):
                self._group_states[index], self._group_steps[index] = None, 0
                continue
            if any(e is None for e in entries):
                raise ValueError(f"parameter group {index} of the checkpoint has state for "
                                 "some of its parameters only")
            self._group_steps[index] = int(entries[0]["step"])
            self._built[index] = None
            template = self._init_group(index, self._transform(index)[0])
            self._group_states[index] = unflatten_state(template, entries, entries[0])
        self._refresh_state_view()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def chain_state(self, index: int = 0) -> Any:
        """The transform state of parameter group ``index`` (None before its first step)."""
        return self._group_states[index]

    # ------------------------------------------------------------------------------------------
    # Copies

    def __getstate__(self) -> dict[str, Any]:
        """All of the optimizer but its built chains (and compiled steps), which the next step
        builds again: ``copy.deepcopy`` and pickling (``torch.save(optimizer)``) then work as for
        torch's optimizers, and a copy never shares a compiled step, nor the learning-rate
        tensor that step reads, with the original. (An optimizer of a built transform pickles
        only if the transform's functions do; a recipe's optimizer pickles.)"""
        state = dict(self.__dict__)
        state["_built"] = [None] * len(self._built)
        state["_state_view"] = None
        state["_step_code"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._refresh_state_view()


def _make_step(tx: GradientTransformation, apply: bool = True, lend: bool = False
               ) -> Callable[..., Any]:
    """One update of a piece: applies it and returns the state, or, with ``apply=False``,
    returns ``(updates, state)`` for the caller to apply.

    A chain that ends in decoupled weight decay and a scale (the learning rate) is applied as
    ``x <- x + b·x + a·u`` (``unscaled``): two passes over the parameters where adding the
    decay, scaling and adding would take three; 16-bit parameters take the whole update in
    float32 instead, rounded once. With ``lend`` (eager mode) the chain's members may lend their
    state as updates (the ``borrowed`` extra): this step only reads them, and a chain that can
    (``into_params``: SM3's) adds its own updates to the parameters, block by block.
    """

    def step(grads: dict[str, Tensor], state: Any, params: dict[str, Tensor],
             extras: dict[str, Any]) -> Any:
        if lend:
            extras = {**extras, "borrowed": set()}
        if not apply:
            return tx.update(grads, state, params, grads=grads, **extras)
        x = leaves(params)
        wide = not any(p.dtype in _LOW_PRECISION for p in x)
        if wide and lend and tx.into_params is not None:
            return tx.into_params(grads, state, params, 1.0, 0.0, grads=grads, **extras)
        if tx.unscaled is None or not wide:
            updates, state = tx.update(grads, state, params, grads=grads, **extras)
            torch._foreach_add_(x, leaves(updates))
            return state
        updates, state, a, b = tx.unscaled(grads, state, params, grads=grads, **extras)
        add_scaled_(x, leaves(updates), a, b)
        return state

    return step


def _pieces(params: list[Tensor], active: list[int], tx: GradientTransformation,
            foreach: bool | None = None, state: Any = None
            ) -> list[tuple[list[int], slice | EllipsisType | None]]:
    """How a step runs over the group: ``(parameter indices, rows)`` pieces.

    With ``foreach=None``: on CPU, a leafwise transform runs over pieces of about
    ``_piece_elements(...)`` parameter elements, each applied while its tensors are in cache; an
    elementwise one also splits a large parameter into blocks of rows (``rows``, a slice of its
    first axis).
    Elsewhere: one piece. ``foreach=True``: one piece; ``foreach=False``: one piece per
    parameter for a leafwise transform. Whatever ``foreach``, an elementwise transform runs
    DTensor parameters (FSDP2's shards) as one piece of their local shards (``rows`` =
    ``...``): every entry only needs the same entry of the others.
    """
    if tx.elementwise and any(is_dtensor(params[i]) for i in active):
        return [(active, ...)]
    if foreach is False and tx.leafwise:
        return [([i], None) for i in active]
    if foreach or not tx.leafwise or any(params[i].device.type != "cpu" for i in active):
        return [(active, None)]
    elements = _piece_elements(params, active, state)
    pieces: list[tuple[list[int], slice | EllipsisType | None]] = []
    current: list[int] = []
    size = 0
    for i in active:
        p = params[i]
        if tx.elementwise and p.dim() > 0 and p.numel() >= 2 * elements:
            step = max(1, elements * p.shape[0] // p.numel())
            pieces.extend(([i], slice(start, start + step)) for start in range(0, p.shape[0], step))
            continue
        current.append(i)
        size += p.numel()
        if size >= elements:
            pieces.append((current, None))
            current, size = [], 0
    if current:
        pieces.append((current, None))
    return pieces


def _piece_elements(params: list[Tensor], active: list[int], state: Any) -> int:
    """Parameter elements per piece: ``CHUNK_ELEMENTS`` shared among the tensors of the largest
    parameter's size that its update touches (itself, its gradient, its state of that size)."""
    largest = max(active, key=lambda i: params[i].numel())
    size = params[largest].numel()
    entry = flatten_state(select_state(state, [largest]), 1)[0][0]
    tensors = 2 + sum(1 for t in entry.values() if isinstance(t, Tensor) and t.numel() == size)
    return max(1, CHUNK_ELEMENTS // tensors)


def _block(tensor: Tensor, rows: slice | EllipsisType | None) -> Tensor:
    return tensor if rows is None else local_shard(tensor)[rows]


def _rows_of(state: Any, rows: slice | EllipsisType) -> Any:
    """The state of one parameter with every per-parameter tensor restricted to ``rows`` (of
    its local shard, for a DTensor)."""
    if isinstance(state, list):
        return [_rows_of_entry(entry, rows) for entry in state]
    if isinstance(state, tuple):
        items = [_rows_of(s, rows) for s in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    if isinstance(state, dict):
        return {k: _rows_of(v, rows) for k, v in state.items()}
    return state


def _rows_of_entry(entry: Any, rows: slice | EllipsisType) -> Any:
    if isinstance(entry, Tensor):
        return local_shard(entry)[rows]
    if isinstance(entry, (tuple, list)):
        return type(entry)(_rows_of_entry(e, rows) for e in entry)
    return entry


def _saved_entry(state: Mapping[Any, Any], index: int) -> dict[str, Any] | None:
    """Parameter ``index``'s entry of a checkpoint's ``"state"``. Loading into an
    ``optimizer.state_dict()``, ``torch.distributed.checkpoint.load`` fills the tensors in
    place but writes the Python values (step counts) under ``str(index)``: those win."""
    entry, loaded = state.get(index), state.get(str(index))
    return entry if loaded is None else {**(entry or {}), **loaded}


def _value(hyperparameter: Any, step: int) -> Any:
    """A group's hyperparameter at the group's step; a decay schedule that its transform
    evaluates with its own update count (``palm_beta2``, which has a ``product``) passes as is."""
    if hasattr(hyperparameter, "product"):
        return hyperparameter
    return resolve(hyperparameter, step)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _widen(grad: Tensor) -> Tensor:
    return grad.float() if grad.dtype in _LOW_PRECISION else grad


def _check_gradient(name: str, param: Tensor, accepts_sparse: bool) -> None:
    grad = param.grad
    assert grad is not None
    if grad.shape != param.shape:
        raise ValueError(f"the gradient of parameter {name!r} has shape {tuple(grad.shape)}, "
                         f"the parameter has {tuple(param.shape)}")
    if grad.layout != torch.strided and not accepts_sparse:
        raise ValueError(f"parameter {name!r} has a sparse gradient; this optimizer needs dense "
                         "gradients (e.g. nn.Embedding(sparse=False))")
    check_gradient_layout(name, param)


def _finite_gradients(groups: list[dict[str, Any]]) -> bool:
    """Whether every gradient of every group is finite (one host synchronisation)."""
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad
             for group in groups for p in group["params"] if p.grad is not None]
    return all_finite([g.detach() for g in grads])


def _check_graph(params: list[Tensor]) -> None:
    """On a step with Hessian-vector products and no closure, some gradient must carry its
    graph (``backward(create_graph=True)``). A gradient without one is then constant in the
    parameters, and its rows of H are zero (as with a closure, which the optimizer runs with
    the graph)."""
    if params and not any(p.grad.grad_fn is not None for p in params):
        raise ValueError(
            "this step uses Hessian-vector products, but no gradient has its graph: call "
            "loss.backward(create_graph=True) on steps where optimizer.needs_hvp() is True, or "
            "pass a closure to step() and the optimizer runs it with the graph")


_HVP_UNDER_DDP = (
    "this step needs Hessian-vector products (ESGD, RTHO, MARTHE), so the closure's backward "
    "keeps the gradient's graph (create_graph=True), and DistributedDataParallel cannot "
    "synchronise such gradients (its reducer fails on them and would not average the "
    "products). Train this optimizer without DDP, or use a gradient-only one under DDP "
    "(hd-sgd and hd-adam learn the learning rate from the training gradient)")


@contextmanager
def _backward_with_graph(enabled: bool) -> Iterator[None]:
    """Inside, ``loss.backward()`` (and ``torch.autograd.backward``) builds the graph of the
    gradient, as with ``create_graph=True``; the optimizer releases it after the step. A
    ``DistributedDataParallel`` forward raises: DDP cannot synchronise such gradients."""
    if not enabled:
        yield
        return
    original = torch.autograd.backward

    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                 *args: Any, **kwargs: Any):
        return original(tensors, grad_tensors, retain_graph, True, *args, **kwargs)

    torch.autograd.backward = backward
    try:
        with warnings.catch_warnings(), refusing_data_parallel(_HVP_UNDER_DDP):
            warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle")
            yield
    finally:
        torch.autograd.backward = original


def _hvp(names: list[str], params: list[Tensor]) -> Callable[[dict[str, Tensor]],
                                                              dict[str, Tensor]]:
    """``v -> H v`` for the loss whose gradients (with their graph) are in ``p.grad``."""
    grads = [p.grad for p in params]
    # a gradient without a graph is constant in the parameters: it adds nothing to H v
    graphed = [i for i, g in enumerate(grads) if g.grad_fn is not None]

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        products: Sequence[Tensor | None] = [None] * len(params)
        if graphed:
            outputs = [v[names[i]].to(grads[i].dtype) for i in graphed]
            with torch.enable_grad():
                products = torch.autograd.grad([grads[i] for i in graphed], params,
                                               grad_outputs=outputs, retain_graph=True,
                                               allow_unused=True)
        return {n: torch.zeros_like(v[n]) if h is None else h.detach().to(v[n].dtype)
                for n, h in zip(names, products)}

    return hvp


def _release_graphs(groups: list[dict[str, Any]]) -> None:
    """Detach gradients made with ``create_graph=True``: frees the graph and the reference
    cycle parameter -> grad -> graph -> parameter."""
    for group in groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.grad_fn is not None:
                p.grad = p.grad.detach()
