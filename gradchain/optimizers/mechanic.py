"""``mechanize``: any ``torch.optim.Optimizer`` class under Mechanic's learned scale
(ALGORITHMS.md §6, §8.3), as ``mechanic_pytorch.mechanize`` offers it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradchain.core import (
    all_finite,
    check_dense_real,
    flatten_state,
    merge_state,
    select_state,
    state_dtype,
    unflatten_state,
)
from gradchain.distributed import is_dtensor, local_shard, local_shards, sum_over_shards
from gradchain.optimizers.adapter import _backward_with_graph, _saved_entry
from gradchain.transforms.mechanic import (
    DEFAULT_BETAS,
    MechanicRule,
    MechanicState,
    mechanic_rule,
    mechanic_scale_value,
)

__all__ = ["mechanize", "Mechanized"]

#: The start of the keys of Mechanic's state in the state_dict's parameter entries.
_PREFIX = "mechanized."


class Mechanized:
    """The mixin of every class that ``mechanize`` returns (``isinstance(opt, Mechanized)``
    says whether an optimizer is mechanized). It expects a ``torch.optim.Optimizer`` after it
    in the method resolution order and a class attribute ``_rule``, Mechanic's
    ``MechanicRule``.

    Example:
        >>> opt = mechanize(torch.optim.Adam)([torch.nn.Parameter(torch.zeros(2))])
        >>> isinstance(opt, Mechanized), opt.scale  # no scale before the first step
        (True, None)
    """

    _rule: MechanicRule
    _mechanize: tuple[type[torch.optim.Optimizer], dict[str, Any]]  # mechanize's arguments
    _mechanic_state: MechanicState | None = None  # over all parameters, in param-group order
    _keep_copy: bool = False  # keep the copy of the parameters between steps
    _kept: dict[int, Tensor] | None = None  # that copy, by parameter index (not in copies)

    def __getstate__(self) -> dict[str, Any]:
        """The base's state for copies and pickles, and Mechanic's (torch's optimizers keep only
        their defaults, state and groups)."""
        return {**super().__getstate__(), "_mechanic_state": self._mechanic_state}

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        """Copies and pickles rebuild the class with ``mechanize``'s arguments: it is made at run
        time, so pickle cannot find it by name."""
        return _new_mechanized, self._mechanize, self.__getstate__()

    @property
    def scale(self) -> float | None:
        """The learned scale :math:`S = \\sum_i s_i` (None before the first step)."""
        state = self._mechanic_state
        return None if state is None else mechanic_scale_value(state)

    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """The base optimizer's step, then Mechanic's rescaling of the displacement.

        With a closure, it runs once here (under ``torch.enable_grad``, with the
        double-backward graph when the base's ``needs_hvp()`` says so); the base receives a
        closure that returns that loss on its first call and evaluates again afterwards.
        Other keyword arguments go to the base step. Returns what the base step returns.
        Outside ``torch.compile``, as gradchain's optimizers: a compiled caller runs it as it
        is (a gradchain base with ``compile=True`` compiles its own graph).
        """
        loss_closure = None if closure is None else self._evaluated_once(closure)
        params = self._all_params()
        active = [i for i, p in enumerate(params) if p.grad is not None]
        if not active:
            return self._base_step()(loss_closure, **kwargs)
        rule = self._rule
        with torch.no_grad():
            state = self._state_over(params)
            part = select_state(state, active)
            x = [params[i].detach() for i in active]
            g = [params[i].grad.detach() for i in active]
            check_dense_real(g, "mechanize")  # before anything moves
            if getattr(self, "_skip_nonfinite", False) and not all_finite(g):
                return self._base_step()(loss_closure, **kwargs)  # it skips, and so do we
            if part.count == 0:
                torch._foreach_copy_(local_shards(part.x_ref), local_shards(x, part.x_ref))
            # one pass before the base step (which may change .grad in place): the copy
            # x_before and the sums that read the gradient, <g, shift> and |g|^2, shift = x -
            # x_ref (or the stored delta); the optax variant's decay term reads x_t too
            x_before = [self._copy_buffer(i, p) for i, p in zip(active, x)]
            vectors = [g, x] if rule.s_decay and rule.optax else [g]
            g_shift, *sums = _sums(rule, part, x, vectors, vectors if rule.s_decay else [],
                                   copy=x_before)
        result = self._base_step()(loss_closure, **kwargs)
        with torch.no_grad():
            x_after = [params[i] for i in active]
            decay_terms = None
            if rule.s_decay:
                if rule.optax:  # <x_t, shift>, |g|^2, |x_t|^2
                    decay_terms = (sums[1].sqrt(), sums[2].sqrt(), sums[0])
                else:  # mechanic_pytorch's point is x_t + u_t
                    point_shift, point_square = _sums(rule, part, x_before, [x_after],
                                                      [x_after])
                    decay_terms = (sums[0].sqrt(), point_square.sqrt(), point_shift)
            new = rule.tune(part, rule.hypergradient(part, g_shift, decay_terms))
            _write_scaled(rule, part, new, x_before, x_after)
            self._mechanic_state = merge_state(state, new, active)
        return result

    def state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict()`` with Mechanic's state added to every parameter's entry
        (torch's parameter ids), under keys that start with ``"mechanized."``:
        ``"mechanized.x_ref"`` (and ``"mechanized.delta"`` with ``store_delta``), and the
        values shared by all parameters, repeated in each: ``"mechanized.count"``,
        ``"mechanized.s"``, ``"mechanized.m"``, ``"mechanized.v"``, ``"mechanized.r"``.
        Before the first step they hold the initial state (count 0). In this layout the state
        survives ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``, which keeps
        only ``"state"`` and ``"param_groups"``."""
        state_dict = super().state_dict()  # type: ignore[misc]
        params = self._all_params()
        per_param, shared = flatten_state(self._state_over(params), len(params))
        packed = dict(state_dict["state"])  # the base's entries may be its live state: copied
        for i, entry in enumerate(per_param):
            ours = {f"{_PREFIX}{key}": value for key, value in {**shared, **entry}.items()}
            packed[i] = {**packed.get(i, {}), **ours}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; continuing gives the same trajectory as never stopping."""
        base_state, ours = {}, {}
        for key, entry in state_dict["state"].items():
            base = {k: v for k, v in entry.items() if not k.startswith(_PREFIX)}
            if base:
                base_state[key] = base
            ours[key] = {k[len(_PREFIX):]: v for k, v in entry.items() if k.startswith(_PREFIX)}
        super().load_state_dict({**state_dict, "state": base_state})  # type: ignore[misc]
        params = self._all_params()
        # the saved ids in the order of the parameters (torch's ids, or the names that
        # torch.distributed.checkpoint's set_optimizer_state_dict passes)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        per_param = [_saved_entry(ours, i) or {} for i in ids]
        if not any(per_param):
            self._mechanic_state = None
            return
        saved_delta = per_param[0].get("delta") is not None
        if saved_delta != self._rule.store_delta:
            raise ValueError(f"the checkpoint was saved with store_delta={saved_delta} (Mechanic's "
                             f"stored displacement 'delta'), this optimizer has "
                             f"store_delta={self._rule.store_delta}")
        self._mechanic_state = unflatten_state(self._rule.init(params), per_param, per_param[0])

    # ------------------------------------------------------------------------------------------

    def _copy_buffer(self, index: int, param: Tensor) -> Tensor:
        """A buffer for the copy of parameter ``index`` before the base step: a new one, or
        with ``keep_copy`` the one kept from the steps before (made anew if the parameter
        changed shape, dtype or device)."""
        buffer = (self._kept or {}).get(index)
        if buffer is None or buffer.shape != param.shape or buffer.device != param.device or \
                buffer.dtype != state_dtype(param):
            buffer = torch.empty_like(param, dtype=state_dtype(param))
            if self._keep_copy:
                if self._kept is None:
                    self._kept = {}
                self._kept[index] = buffer
        return buffer

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]  # type: ignore

    def _state_over(self, params: list[Tensor]) -> MechanicState:
        """The state, created at the first step and grown for parameters added since (their
        x_ref is their value now, before the base step moves them)."""
        state = self._mechanic_state
        if state is None:
            return self._rule.init(params)
        known = len(state.x_ref)
        if known == len(params):
            return state
        added = self._rule.init(params[known:])
        return MechanicState(*(old + new if isinstance(old, list) else old
                               for old, new in zip(state, added)))

    def _evaluated_once(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """Run ``closure`` now; return one that replays its loss once, then re-evaluates."""
        needs_hvp = getattr(self, "needs_hvp", None)
        curvature = callable(needs_hvp) and bool(needs_hvp())
        with torch.enable_grad(), _backward_with_graph(curvature):
            loss = closure()
        calls = 0

        def replay() -> Any:
            nonlocal calls
            calls += 1
            return loss if calls == 1 else closure()

        return replay

    def _base_step(self) -> Callable[..., Any]:
        """The base class's step, without torch's step hooks (they run once, around ours)."""
        step = super().step  # type: ignore[misc]
        if getattr(step, "hooked", False):
            return functools.partial(step.__wrapped__, self)
        return step


def mechanize(optimizer_class: type[torch.optim.Optimizer], *, s_decay: float = 0.01,
              betas: Sequence[float] = DEFAULT_BETAS, s_init: float | None = None,
              eps: float = 1e-8, store_delta: bool = False, variant: str = "optax",
              keep_copy: bool = False) -> type:
    r"""A subclass of ``optimizer_class`` whose steps Mechanic rescales by a learned S.

    Any ``torch.optim.Optimizer`` works (``torch.optim.SGD``, ``torch.optim.AdamW``,
    ``gradchain.optimizers.SOAP``, ...): each step runs the base step, observes its
    displacement :math:`u = x_{after} - x_{before}` and sets the parameters to
    :math:`x_{ref} + S\,(\Delta + u)` with ``mechanic_scale`` (see there for the math and the
    options; ``variant="pytorch"`` with ``s_init=None`` reproduces
    ``mechanic_pytorch.mechanize``). Construct it with the base's arguments; its ``lr`` is the
    base step that Mechanic scales (1.0 is a good choice; excessively small values cost
    precision, as the effective step is S·lr). With bfloat16 parameters use
    ``store_delta=True``: the first steps, ~s_init·lr, are below their resolution, and
    without a stored Δ Mechanic would not see them (see ``mechanic_scale``).

    One scale S for all parameter groups (the paper's and ``mechanic_pytorch``'s choice);
    parameters without a gradient are left out of a step. ``add_param_group``, ``zero_grad``,
    LR schedulers (they act on the base's ``group["lr"]``), closures (run once; the base gets a
    closure that replays that loss first), Hessian-vector products of gradchain optimizers
    (``needs_hvp()``), step hooks and ``state_dict``/``load_state_dict`` (the base's, with
    Mechanic's state in every parameter's entry, loadable with
    ``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``) work. ``scale``
    is the current S, for logging. The options of a gradchain base (``compile``, ``foreach``,
    ``skip_nonfinite``, ...) apply to its step; when it skips a step for a non-finite
    gradient, Mechanic's state is left alone too.

    Memory: one parameter-sized buffer persists beyond the base's state, x_ref (two with
    ``store_delta=True``). During a step, the parameters that have gradients are copied once
    (the parameters before the base step, widened to float32 if 16-bit); the sums that read the
    gradients are taken before the base step, so the gradients are not copied, and the rest
    works in pieces of 2^18 elements with two reused temporaries of the largest piece's size
    (a whole parameter's where it is not contiguous, or a DTensor). ``keep_copy=True`` keeps
    that copy between steps, a second parameter-sized buffer (outside the state_dict), rather
    than allocating it at every step: on CPU each fresh allocation is faulted into memory, and
    keeping it cut the time the wrapper adds by 14% (around gradchain's AdamW) to 42% (around
    torch's) on 27M parameters.

    The class is named ``"Mechanized" + optimizer_class.__name__`` and is also an instance of
    ``Mechanized``; the same arguments give the same class. Its instances copy
    (``copy.deepcopy``) and pickle with Mechanic's state.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = mechanize(torch.optim.SGD)(model.parameters(), lr=1.0)
        >>> model(torch.randn(8, 4)).square().mean().backward(); _ = opt.step()
        >>> type(opt).__name__, isinstance(opt, torch.optim.SGD), f"{opt.scale:.0e}"
        ('MechanizedSGD', True, '1e-06')
    """
    if not (isinstance(optimizer_class, type) and
            issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"mechanize takes a torch.optim.Optimizer class, got {optimizer_class!r}"
                        "; for a transform or a recipe use gradchain.chains.mechanic.mechanize")
    if issubclass(optimizer_class, Mechanized):
        raise ValueError(f"{optimizer_class.__name__} is already mechanized: Mechanic must "
                         "wrap a base optimizer, not another Mechanic")
    options = dict(s_decay=s_decay, betas=betas, s_init=s_init, eps=eps,
                   store_delta=store_delta, variant=variant)
    mechanic_rule(**options)  # checks them
    if not isinstance(keep_copy, bool):
        raise ValueError(f"keep_copy must be True or False, got {keep_copy!r}")
    return _mechanized_class(optimizer_class, tuple({**options, "betas": tuple(betas),
                                                     "keep_copy": keep_copy}.items()))


@functools.lru_cache(maxsize=None)
def _mechanized_class(optimizer_class: type[torch.optim.Optimizer],
                      options: tuple[tuple[str, Any], ...]) -> type:
    """The class of ``mechanize(optimizer_class, **dict(options))``, one per arguments (so that
    copies of an optimizer share its class)."""
    arguments = dict(options)
    rule = mechanic_rule(**{k: v for k, v in arguments.items() if k != "keep_copy"})
    name = f"Mechanized{optimizer_class.__name__}"
    doc = (f"``{optimizer_class.__name__}`` under Mechanic's learned scale "
           f"(``gradchain.optimizers.mechanic.mechanize``, variant {arguments['variant']!r}).")
    return type(name, (Mechanized, optimizer_class),
                {"_rule": rule, "_keep_copy": arguments["keep_copy"],
                 "_mechanize": (optimizer_class, arguments), "__doc__": doc,
                 "__module__": __name__, "__qualname__": name})


def _new_mechanized(optimizer_class: type[torch.optim.Optimizer], options: dict[str, Any]
                    ) -> Mechanized:
    """An uninitialised instance of ``mechanize(optimizer_class, **options)``, for copies."""
    cls = mechanize(optimizer_class, **options)
    return cls.__new__(cls)


#: Elements per piece of the per-parameter passes below: the temporaries of a piece stay in
#: cache between the operations that read them, so each parameter-sized tensor crosses memory
#: once per pass rather than once per operation.
_PIECE_ELEMENTS = 1 << 18


def _pieces(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """Tensors of one shape as aligned flat pieces of ``_PIECE_ELEMENTS`` elements (views), or
    whole when one of them is not contiguous or is a DTensor."""
    if not all(t.is_contiguous() and not is_dtensor(t) for t in tensors):
        return [list(tensors)]
    flat = [t.view(-1) for t in tensors]
    return [[f[start:start + _PIECE_ELEMENTS] for f in flat]
            for start in range(0, flat[0].numel(), _PIECE_ELEMENTS)]


def _temporary(scratch: dict[tuple[Any, ...], Tensor], like: Tensor, slot: int
               ) -> Tensor | None:
    """A buffer shaped as the flat piece ``like``, reused by every piece of a pass (a fresh
    temporary per piece would be faulted in each time); None (allocate) for a whole tensor.
    ``scratch`` holds one buffer per (dtype, device, slot), as large as the largest piece
    asked for so far: a larger piece replaces it with one of its own size."""
    if is_dtensor(like) or like.dim() != 1 or like.numel() > _PIECE_ELEMENTS:
        return None
    key = (like.dtype, like.device, slot)
    buffer = scratch.get(key)
    if buffer is None or buffer.numel() < like.numel():
        buffer = scratch[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buffer[:like.numel()]


def _sums(rule: MechanicRule, state: MechanicState, x: list[Tensor],
          products: list[list[Tensor]], squares: list[list[Tensor]],
          copy: list[Tensor] | None = None) -> list[Tensor]:
    r"""In one pass over the parameters ``x``, piece by piece: :math:`\langle a,
    \text{shift}\rangle` for every list a of ``products``, then :math:`|a|^2` for every list
    a of ``squares``, in the scalars' dtype, over all shards (shift = x - x_ref, formed piece
    by piece, or the stored delta); with ``copy``, x is copied into it on the way."""
    like = state.s
    columns: list[list[Tensor]] = [[] for _ in range(len(products) + len(squares))]
    scratch: dict[tuple[Any, ...], Tensor] = {}
    for i, xi in enumerate(x):
        reference = state.delta[i] if rule.store_delta else state.x_ref[i]
        tensors = [local_shard(t, xi) for t in (xi, reference, *([copy[i]] if copy else []),
                                                *(a[i] for a in products + squares))]
        totals = [like.new_zeros(()) for _ in columns]
        for x_piece, reference_piece, *rest in _pieces(tensors):
            if copy:
                rest.pop(0).copy_(x_piece)
            shift = reference_piece if rule.store_delta else torch.sub(
                x_piece, reference_piece, out=_temporary(scratch, reference_piece, 0))
            shift = shift.reshape(-1).to(like.dtype)
            flat = [a.reshape(-1).to(like.dtype) for a in rest]
            for total, a in zip(totals, flat[:len(products)]):
                total += torch.dot(a, shift).to(like.device)
            for total, a in zip(totals[len(products):], flat[len(products):]):
                total += torch.dot(a, a).to(like.device)
        for column, value in zip(columns, totals):
            column.append(value)
    return [torch.stack(sum_over_shards(column, x)).sum() for column in columns]


def _write_scaled(rule: MechanicRule, state: MechanicState, new: MechanicState,
                  x_before: list[Tensor], x_after: list[Tensor]) -> None:
    r"""Set the parameters to :math:`x_{t+1} = x_t + c\,\text{shift} + S_{t+1} u` (recovered
    Δ) or :math:`x_{ref} + S_{t+1}\Delta_{t+1}` (stored Δ), u = x_after - x_before, piece by
    piece; each entry is rounded once to the parameter's dtype."""
    new_scale = rule.scale(new)
    c = None if rule.store_delta else rule.shift_coefficient(state, new_scale)
    scratch: dict[tuple[Any, ...], Tensor] = {}
    for i, (before, after) in enumerate(zip(x_before, x_after)):
        tensors = [before, after, state.x_ref[i], *([state.delta[i]] if rule.store_delta else [])]
        for b, a, ref, *delta in _pieces(tensors):
            u = torch.sub(a.to(b.dtype), b, out=_temporary(scratch, b, 0))
            if rule.store_delta:
                delta[0].add_(u)
                # as the chain rounds it: x + ((S Delta + x_ref) - x)
                target = torch.mul(delta[0], new_scale, out=_temporary(scratch, b, 1))
                target.add_(ref).sub_(b).add_(b)
            else:
                target = torch.sub(b, ref, out=_temporary(scratch, b, 1))
                target.mul_(c).add_(u.mul_(new_scale)).add_(b)
            a.copy_(target)
