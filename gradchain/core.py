"""The contracts every transform, combinator and optimizer of gradchain stands on.

Trees
    ``params`` and ``updates`` are *trees*: a list of tensors or a dict ``name -> tensor``.
    Every transform returns the structure it was given. Names matter: masks and partitions
    select parameters by name (``fnmatch`` patterns), by predicate, or by a same-structure tree.

State
    A transform holds configuration only; its mutable data lives in the state it returns. States
    are built from NamedTuples, tuples and dicts, and follow one rule that the optimizer adapter,
    checkpoints and combinators rely on:

        **a ``list`` inside a state holds one entry per parameter, in tree order;**
        anything else that is not a tuple or dict (ints, floats, 0-d tensors) is group-wide.

    With this rule a state can be restricted to a subset of the parameters (``select_state``),
    written back (``merge_state``), and flattened to torch's per-parameter ``state_dict`` layout
    with stable, readable keys taken from the NamedTuple field names (``flatten_state``).

Ownership
    A transform may update its own state tensors in place, and may overwrite the updates it was
    handed, except the raw gradient (``writable``) and never a tensor it keeps in its state:
    outputs are handed over, so a later transform may write into them.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, Union

import torch
from torch import Tensor

__all__ = [
    "Tree",
    "Schedule",
    "Hyper",
    "Selector",
    "GradientTransformation",
    "EmptyState",
    "leaves",
    "as_tree",
    "names",
    "subset",
    "selected_indices",
    "apply_updates",
    "add_scaled_",
    "divide_into_",
    "stochastic_round_",
    "all_finite",
    "writable",
    "lend",
    "state_dtype",
    "zeros_like_state",
    "resolve",
    "decay_product",
    "debiased_decay",
    "second_moment_decay",
    "hoist",
    "lerp_",
    "select_state",
    "merge_state",
    "merge_states",
    "find_state",
    "hessian_vector_products",
    "expand_state",
    "flatten_state",
    "unflatten_state",
    "needs_hvp",
    "check_structure",
    "check_dense_real",
    "check_number",
    "check_constant",
    "check_non_negative",
    "check_positive",
    "check_decay",
    "check_choice",
]

Tree = Union[list[Tensor], dict[str, Tensor]]
Schedule = Callable[[int], float]
Hyper = Union[float, Schedule]
Selector = Union[Callable[[str, Tensor], Any], Sequence[Any], Mapping[str, Any]]


class UpdateFn(Protocol):
    def __call__(
        self, updates: Tree, state: Any, params: Tree | None = None, **extras: Any
    ) -> tuple[Tree, Any]: ...


class GradientTransformation(NamedTuple):
    """An ``init``/``update`` pair with two facts about it.

    ``init(params) -> state`` and ``update(updates, state, params=None, **extras) ->
    (updates, state)``. ``terminal`` transforms emit the final parameter displacement themselves
    and must come last in a chain. ``leafwise`` transforms treat every parameter independently
    (no reduction across parameters, and group-wide state that depends on the step count only),
    so the optimizer adapter may run them over a few parameters at a time, while those are hot in
    cache. ``elementwise`` transforms are leafwise, and moreover every output entry depends only
    on the same entry of the inputs and of the state, which they update in place; the adapter
    may then run a large parameter as blocks of rows (views; a mask sees the parameter's name).
    A transform that is not sure is neither.

    ``needs_hvp(state) -> bool``, when given, says whether the next ``update`` from ``state``
    uses the ``hvp`` extra (a callable ``v -> H v`` of the same minibatch loss), so that a
    training loop builds the double-backward graph only on those steps. ``accepts_sparse``
    transforms take sparse COO gradients. ``provides`` holds extras that a chain member hands
    to the members after it in its chain (``palm_beta2`` as a member provides the
    ``second_moment_decay`` extra). ``unscaled(updates, state, params=None, **extras) -> (u,
    state, a, b)``, when given, is ``update`` without its last acts, a scaling and decoupled
    weight decay: ``update`` returns ``a·u + b·params`` (a and b scalars). An optimizer that adds
    the result to its parameters folds them into that addition (``x <- (1 + b)·x + a·u``,
    passes over the updates fewer); ``inject_hyperparams`` offers it when the transform it
    builds does. ``affine`` transforms are such a scaling or decay and nothing else: ``update``
    returns ``a·u + b·params`` of the updates as given, and so does ``unscaled`` (``scale``,
    ``scale_by_learning_rate``, unmasked ``add_decayed_weights``).
    ``into_params(updates, state, params, a, b, **extras) -> state``, when given, adds the
    transform's updates to the parameters itself, ``params <- params + b·params + a·u`` in place:
    the same numbers as ``unscaled`` (``update`` where there is none) followed by that addition,
    but u may be added block by block and never held whole (SM3's and SOAP's eager steps
    allocate no parameter-sized temporary). A chain offers it when its last member before a tail
    of affine members does; ``masked``, ``partition``, ``inject_hyperparams``, ``multi_steps``
    and ``apply_if_finite`` when a transform they wrap applies itself (its ``into_params`` or
    ``unscaled``): its parameters then move by the numbers it gives alone, through its own
    ``into_params``, ``unscaled`` or ``update``.

    Defaults: every flag False, ``needs_hvp``, ``provides``, ``unscaled`` and ``into_params``
    None.

    Example:
        >>> halve = GradientTransformation(
        ...     init=lambda params: EmptyState(),
        ...     update=lambda updates, state, params=None, **extras: (
        ...         [u / 2 for u in updates], state),
        ...     leafwise=True)
        >>> halve.update([torch.tensor([2.0, -4.0])], halve.init([torch.zeros(2)]))
        ([tensor([ 1., -2.])], EmptyState())
    """

    init: Callable[[Tree], Any]
    update: UpdateFn
    terminal: bool = False
    leafwise: bool = False
    elementwise: bool = False
    needs_hvp: Callable[[Any], bool] | None = None
    accepts_sparse: bool = False
    provides: Mapping[str, Any] | None = None
    unscaled: Callable[..., tuple[Tree, Any, Any, Any]] | None = None
    affine: bool = False
    into_params: Callable[..., Any] | None = None


class EmptyState(NamedTuple):
    """The state of a transform that keeps none.

    Example:
        >>> from gradchain.transforms import scale
        >>> scale(0.5).init([torch.zeros(2)])
        EmptyState()
    """


# ----------------------------------------------------------------------------------------------
# Trees


def leaves(tree: Tree | Sequence[Tensor]) -> list[Tensor]:
    """The tensors of a tree, in order (dict insertion order).

    Example:
        >>> leaves({"w": torch.zeros(2), "b": torch.ones(1)})
        [tensor([0., 0.]), tensor([1.])]
    """
    if isinstance(tree, Mapping):
        return list(tree.values())
    return list(tree)


def as_tree(like: Tree, new_leaves: Sequence[Any]) -> Tree:
    """``new_leaves`` arranged in the structure of ``like``.

    Example:
        >>> as_tree({"w": torch.zeros(2), "b": torch.zeros(1)}, [torch.ones(2), torch.ones(1)])
        {'w': tensor([1., 1.]), 'b': tensor([1.])}
    """
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), new_leaves))
    return list(new_leaves)


def names(tree: Tree) -> list[str]:
    """Parameter names: the dict keys, or the positions as strings for a list.

    Example:
        >>> names({"w": torch.zeros(2), "b": torch.zeros(1)}), names([torch.zeros(2)] * 2)
        (['w', 'b'], ['0', '1'])
    """
    if isinstance(tree, Mapping):
        return [str(k) for k in tree.keys()]
    return [str(i) for i in range(len(tree))]


def subset(tree: Tree, index: Sequence[int]) -> Tree:
    """The leaves at positions ``index``, in the structure of ``tree``.

    Example:
        >>> subset({"w": torch.zeros(2), "b": torch.ones(1)}, [1])
        {'b': tensor([1.])}
    """
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        return {keys[i]: tree[keys[i]] for i in index}
    return [tree[i] for i in index]


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _lookup(name: str, table: Mapping[str, Any], what: str) -> Any:
    for pattern, value in table.items():
        if _matches(name, pattern):
            return value
    raise ValueError(
        f"no {what} for parameter {name!r}: add its name or a pattern such as '*' to the mapping"
    )


def selected_indices(tree: Tree, selector: Selector, what: str = "mask") -> list[Any]:
    """Evaluate a selector on every leaf of ``tree``; returns one value per leaf.

    A selector is one of:

    - a callable ``(name, tensor) -> value`` (names are dict keys, or positions as strings);
    - a mapping ``pattern -> value``: the first ``fnmatch`` pattern matching the name wins
      (a dict of exact names is the same-structure tree of a dict);
    - a sequence of strings (patterns): ``True`` where a pattern matches, ``False`` elsewhere;
    - a sequence of one value per leaf (the same-structure tree of a list).

    ``what`` (default ``"mask"``) names the selector in errors; only a mask reads a sequence of
    strings as patterns.

    Example:
        >>> tree = {"layer.weight": torch.zeros(2, 2), "layer.bias": torch.zeros(2)}
        >>> selected_indices(tree, ["*.bias"])
        [False, True]
        >>> selected_indices(tree, lambda name, p: p.ndim >= 2)
        [True, False]
        >>> selected_indices(tree, {"*.weight": 0.1, "*": 0.0}, what="weight decay")
        [0.1, 0.0]
    """
    tree_names = names(tree)
    tensors = leaves(tree)
    if callable(selector):
        return [selector(n, t) for n, t in zip(tree_names, tensors)]
    if isinstance(selector, Mapping):
        return [_lookup(n, selector, what) for n in tree_names]
    if isinstance(selector, (str, bytes)):
        raise TypeError(f"{what} must be a list of patterns, not a single string: [{selector!r}]")
    values = list(selector)
    if what == "mask" and all(isinstance(v, str) for v in values) and \
            (values or isinstance(tree, Mapping)):
        return [any(_matches(n, p) for p in values) for n in tree_names]
    if isinstance(tree, Mapping):
        raise ValueError(
            f"the parameters are named, so a {what} cannot be a list by position; use name "
            "patterns, a mapping pattern -> value, or a callable (name, tensor) -> value"
        )
    if len(values) != len(tensors):
        raise ValueError(
            f"{what} has {len(values)} entries for {len(tensors)} parameters; give one per "
            "parameter, a mapping of name patterns, or a callable (name, tensor) -> value"
        )
    return values


# ----------------------------------------------------------------------------------------------
# Updates


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host synchronisation in the
    common case.

    A finite 2-norm implies finite entries, and ``_foreach_norm`` is ten times faster than a
    max-norm on the CPU; only when some 2-norm is not finite (a non-finite entry, or large finite
    values whose squares overflow) are the max-norms computed, which decide exactly.

    Example:
        >>> all_finite([torch.ones(2), torch.tensor([1.0, float("nan")])])
        False
        >>> all_finite([torch.full((4,), 3e38)])  # its 2-norm overflows; its entries are finite
        True
        >>> all_finite([torch.full((2,), 1e300, dtype=torch.float64)])
        True
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    return _norms_finite(torch._foreach_norm(tensors)) or _norms_finite(
        torch._foreach_norm(tensors, ord=math.inf))


def _norms_finite(norms: Sequence[Tensor]) -> bool:
    """Whether every norm is finite (one host synchronisation)."""
    device = norms[0].device
    return bool(torch.stack([n.isfinite().to(device) for n in norms]).all())


def check_structure(updates: Tree, params: Tree, what: str = "updates") -> None:
    """Raise ``ValueError`` unless ``updates`` has the structure and shapes of ``params``.

    ``what`` (default ``"updates"``) names ``updates`` in the message.

    Example:
        >>> check_structure([torch.zeros(3)], [torch.zeros(2)])
        Traceback (most recent call last):
            ...
        ValueError: updates for parameter '0' has shape (3,), the parameter has (2,)
    """
    if isinstance(updates, Mapping) != isinstance(params, Mapping):
        raise ValueError(
            f"{what} is a {type(updates).__name__} but params is a {type(params).__name__}; "
            "pass both as lists or both as dicts"
        )
    if isinstance(params, Mapping):
        if list(updates.keys()) != list(params.keys()):  # type: ignore[union-attr]
            missing = set(params) - set(updates)  # type: ignore[arg-type]
            extra = set(updates) - set(params)  # type: ignore[arg-type]
            raise ValueError(
                f"{what} and params have different names (missing: {sorted(missing)}, "
                f"unexpected: {sorted(extra)}) or order"
            )
    u, p = leaves(updates), leaves(params)
    if len(u) != len(p):
        raise ValueError(f"{what} has {len(u)} tensors but params has {len(p)}")
    for n, a, b in zip(names(params), u, p):
        if a.shape != b.shape:
            raise ValueError(
                f"{what} for parameter {n!r} has shape {tuple(a.shape)}, "
                f"the parameter has {tuple(b.shape)}"
            )


def check_dense_real(updates: Iterable[Tensor], transform: str) -> None:
    """Raise ``ValueError`` for sparse or complex tensors, naming the transform.

    Example:
        >>> check_dense_real([torch.zeros(2, dtype=torch.complex64)], "sm3")
        Traceback (most recent call last):
            ...
        ValueError: sm3 does not support complex tensors; optimize torch.view_as_real(param) instead
    """
    for u in updates:
        if u.is_sparse or u.layout != torch.strided:
            raise ValueError(
                f"{transform} does not support sparse gradients; use a dense gradient "
                "(e.g. nn.Embedding(sparse=False)) or a transform that takes sparse ones"
            )
        if u.is_complex():
            raise ValueError(
                f"{transform} does not support complex tensors; optimize "
                "torch.view_as_real(param) instead"
            )


def writable(updates: Sequence[Tensor], extras: Mapping[str, Any],
             positions: Sequence[int] | None = None) -> list[Tensor]:
    """The updates (those at ``positions``, default all) as tensors this transform may overwrite
    in place.

    The raw gradient (the ``grads`` extra that ``chain`` sets, leaf for leaf in the same
    positions as the updates) is cloned, so ``param.grad`` and the ``grads`` seen by later
    transforms stay intact, and so is a borrowed update (its ``id`` in the ``borrowed`` extra: a
    transform's own state, passed on without a copy); every other tensor is returned as is.
    Outside a chain (no ``grads`` extra) everything is cloned.

    Example:
        >>> g = [torch.ones(2)]
        >>> out = writable(g, {"grads": g})             # the raw gradient: a copy
        >>> out[0] is g[0], writable(out, {"grads": g})[0] is out[0]
        (False, True)
    """
    index = range(len(updates)) if positions is None else positions
    raw = extras.get("grads")
    if raw is None:
        return [updates[i].clone() for i in index]
    grads, borrowed = leaves(raw), extras.get("borrowed")
    # id() only when something is borrowed: dynamo would guard on every id it sees
    return [updates[i].clone()
            if updates[i] is grads[i] or (borrowed and id(updates[i]) in borrowed)
            else updates[i] for i in index]


def lend(buffers: list[Tensor], extras: Mapping[str, Any]) -> bool:
    """Whether a transform may output ``buffers`` (its own state) without a copy: it may when
    the caller accepts borrowed updates (a ``borrowed`` extra, a set), which then records their
    ids, so that a later member copies before writing (``writable``).

    Example:
        >>> m, borrowed = [torch.ones(2)], set()
        >>> lend(m, {}), lend(m, {"borrowed": borrowed}), id(m[0]) in borrowed
        (False, True, True)
    """
    borrowed = extras.get("borrowed")
    if borrowed is None:
        return False
    borrowed.update(map(id, buffers))
    return True


@torch.no_grad()
def apply_updates(params: Tree, updates: Tree, stochastic_rounding: bool = False,
                  generator: torch.Generator | None = None) -> Tree:
    """``x <- x + u`` for every parameter, in place; returns ``params``.

    Updates of another floating dtype (float32 updates of bfloat16 parameters) are added in the
    wider dtype and rounded once to the parameter dtype: to nearest by default, or, with
    ``stochastic_rounding``, stochastically (``stochastic_round_``) for bfloat16 parameters,
    drawing from ``generator`` (a dedicated one keeps the global random stream untouched).

    Example:
        >>> p = [torch.ones(2)]
        >>> apply_updates(p, [torch.full((2,), -0.5)])
        [tensor([0.5000, 0.5000])]
    """
    check_structure(updates, params)
    p, u = leaves(params), leaves(updates)
    if stochastic_rounding:
        rounded = [x.dtype == torch.bfloat16 for x in p]
        for x, step, rounds in zip(p, u, rounded):
            if rounds:
                stochastic_round_(x, x.float().add_(step), generator)
        p = [x for x, rounds in zip(p, rounded) if not rounds]
        u = [step for step, rounds in zip(u, rounded) if not rounds]
    if p:
        torch._foreach_add_(p, u)
    return params


def add_scaled_(params: list[Tensor], updates: list[Tensor], a: float | Tensor,
                b: float | Tensor = 0.0) -> None:
    """``x <- x + b·x + a·u`` for every parameter, in place: ``x + b·x`` in one rounding (a
    product by ``1 + b`` would round that factor too), then ``a·u`` added; ``a`` and ``b`` are
    numbers or 0-d tensors (learning rates kept as tensors).

    Example:
        >>> x = [torch.ones(2)]
        >>> add_scaled_(x, [torch.ones(2)], -0.5, -0.1); x
        [tensor([0.4000, 0.4000])]
    """
    if isinstance(b, Tensor):
        torch._foreach_add_(params, torch._foreach_mul(params, b))
    elif b != 0:
        torch._foreach_add_(params, params, alpha=b)
    if isinstance(a, Tensor):
        torch._foreach_add_(params, torch._foreach_mul(updates, a))
    else:
        torch._foreach_add_(params, updates, alpha=a)


def divide_into_(numerators: Sequence[Tensor], denominators: Sequence[Tensor]) -> None:
    """``d <- a / d`` for every pair, the quotient written into the denominator's buffer: a
    fresh tensor per quotient would be faulted into memory first (eager mode; under
    ``torch.compile`` a new ``_foreach_div`` list fuses instead).

    Example:
        >>> d = [torch.tensor([2.0, 4.0])]
        >>> divide_into_([torch.ones(2)], d); d
        [tensor([0.5000, 0.2500])]
    """
    for a, d in zip(numerators, denominators):
        torch.div(a, d, out=d)


@torch.no_grad()
def stochastic_round_(target: Tensor, source: Tensor,
                      generator: torch.Generator | None = None) -> Tensor:
    r"""Write ``source`` into the bfloat16 ``target``, rounded stochastically; returns ``target``.

    A float32 value s lies between two neighbouring bfloat16 values; it becomes the one away
    from zero with probability (distance from the one toward zero) / (their spacing), so that
    :math:`E[\mathrm{round}(s)] = s`. Bit-wise: add a uniform 16-bit integer to the float32
    bit pattern and clear the low 16 bits (a carry is exactly the step to the next bfloat16).
    Values already representable, zeros, infinities and NaNs pass through unchanged. Random bits
    come from ``generator`` (the global generator when None).

    Example:
        >>> x = torch.empty(4096, dtype=torch.bfloat16)
        >>> _ = stochastic_round_(x, torch.full((4096,), 1 + 2 ** -10))
        >>> sorted(set(x.tolist()))  # the two neighbours, 1/8 of the draws rounding up
        [1.0, 1.0078125]
    """
    if target.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding writes bfloat16 tensors, got {target.dtype}")
    value = source.detach().to(device=target.device, dtype=torch.float32)
    if value.shape != target.shape:
        value = value.expand(target.shape)
    noise = torch.randint(0, 1 << 16, target.shape, device=target.device, dtype=torch.int32,
                          generator=generator)
    bits = value.contiguous().view(torch.int32)
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)
    target.copy_(torch.where(value.isfinite(), rounded, value))
    return target


# ----------------------------------------------------------------------------------------------
# State helpers


def state_dtype(param: Tensor) -> torch.dtype:
    """Per-parameter state dtype: float32 for 16-bit floats, the parameter's dtype otherwise.

    Example:
        >>> state_dtype(torch.zeros(1, dtype=torch.bfloat16)), state_dtype(torch.zeros(1).double())
        (torch.float32, torch.float64)
    """
    if param.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return param.dtype


def zeros_like_state(params: Iterable[Tensor]) -> list[Tensor]:
    """One zero buffer per parameter, in the state dtype (``state_dtype``).

    Example:
        >>> zeros_like_state([torch.ones(2, dtype=torch.bfloat16)])[0].dtype
        torch.float32
    """
    return [torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            for p in params]


@torch.library.custom_op("gradchain::hoisted", mutates_args=())
def _hoisted(value: Tensor) -> Tensor:
    return value.clone()


@_hoisted.register_fake
def _(value: Tensor) -> Tensor:
    return torch.empty_like(value)


def hoist(value: float | Tensor) -> float | Tensor:
    """A per-step scalar (a bias correction, a scheduled factor) ready for the hot loop.

    In eager mode it is ``value`` itself. Under ``torch.compile`` the step count is symbolic, and
    inductor would inline the scalar's arithmetic (``pow``, ``sqrt``: libm calls it may not hoist)
    into every iteration of the element-wise loop; here it becomes a 0-d float64 tensor that an
    opaque op computes once per step, and the loop only loads it. ``value`` may be a 0-d tensor
    already (a compiled optimizer's learning rate).

    Example:
        >>> hoist(0.5)
        0.5
    """
    if torch.compiler.is_compiling():
        if not isinstance(value, Tensor):
            value = torch.scalar_tensor(value, dtype=torch.float64)
        return _hoisted(value.to(torch.float64))
    return value


def lerp_(buffers: list[Tensor], targets: list[Tensor], weight: float | Tensor) -> None:
    """``b <- b + w (x - b)``, i.e. ``(1 - w) b + w x``, in place, with a per-step weight.

    Under ``torch.compile`` the weight is hoisted (a 0-d tensor) and the lerp goes one tensor at
    a time: inductor fuses ``Tensor.lerp_`` with a tensor weight into the loops around it, while
    ``_foreach_lerp_`` with tensor weights has no lowering and runs as a separate eager kernel
    on materialised inputs (2.7x slower for compiled LaProp on the 27M-parameter benchmark).

    Example:
        >>> b = [torch.zeros(2)]
        >>> lerp_(b, [torch.ones(2)], 0.25); b
        [tensor([0.2500, 0.2500])]
    """
    if torch.compiler.is_compiling():
        w = hoist(weight)
        for b, x in zip(buffers, targets):
            b.lerp_(x, w.to(b.dtype))
        return
    torch._foreach_lerp_(buffers, targets, [weight] * len(buffers))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` for a warning to point at the code that called into gradchain: the
    first frame outside gradchain and torch, whatever wraps the call (torch's step hooks,
    ``torch.compiler.disable``, chains). Under ``torch.compile``: 2."""
    if torch.compiler.is_compiling():
        return 2
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
            "gradchain", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def resolve(value: Hyper, count: int) -> float:
    """A hyperparameter's value at step ``count``: ``value(count)`` for a schedule.

    Example:
        >>> resolve(0.1, 4), resolve(lambda count: 0.1 / (count + 1), 4)
        (0.1, 0.02)
    """
    return value(count) if callable(value) else value


def decay_product(decay: Hyper, count: int) -> float:
    r""":math:`P_t = \prod_{j \le t} \beta_j`, t = count + 1: the weight an EMA with this
    decay still gives its zero initial value after t updates (Adam's bias correction is
    :math:`1 - P_t`).

    For a number, :math:`\beta^t`. A schedule that knows its exact product says so with a
    ``product(count)`` method (``palm_beta2``: 0, since its first decay is 0); any other
    schedule is treated as constant at its current value, :math:`\beta_t^t`.

    Example:
        >>> decay_product(0.5, 2)
        0.125
    """
    # a number is never asked for the method: under torch.compile a decay that differs between
    # param groups is a symbolic float, whose attribute lookup would break the graph
    product = getattr(decay, "product", None) if callable(decay) else None
    if product is not None:
        return float(product(count))
    t = count + 1
    return float(resolve(decay, count)) ** t


def debiased_decay(decay: Hyper, count: int) -> float:
    r"""The decay of an EMA that stores its bias-corrected value directly (in-place debiasing).

    .. math::  \hat\beta_t = 1 - \frac{1 - \beta_t}{1 - P_t}, \qquad
               P_t = \prod_{j \le t} \beta_j \;(\texttt{decay\_product})

    Then :math:`\hat m_t = \hat\beta_t \hat m_{t-1} + (1-\hat\beta_t) u_t` equals Adam's
    :math:`m_t/(1-P_t)` at every step; :math:`\hat\beta_1 = 0`, so the first update ignores
    whatever the buffer held.

    Example:
        >>> debiased_decay(0.9, 0), round(debiased_decay(0.9, 1), 6)  # 0.9 * 0.1 / 0.19
        (0.0, 0.473684)
    """
    beta = float(resolve(decay, count))
    return 1.0 - (1.0 - beta) / (1.0 - decay_product(decay, count))


def second_moment_decay(default: Hyper, extras: Mapping[str, Any]) -> Hyper:
    """The second-moment decay a transform uses: a ``palm_beta2`` (or any schedule) that an
    earlier member of its chain provides as the ``second_moment_decay`` extra, else its own.

    Example:
        >>> second_moment_decay(0.999, {}), second_moment_decay(0.999, {"second_moment_decay": 0.9})
        (0.999, 0.9)
    """
    return extras.get("second_moment_decay", default)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _rebuild(like: tuple, items: Iterable[Any]) -> tuple:
    return type(like)(*items) if _is_namedtuple(like) else tuple(items)


def find_state(state: Any, state_type: type | tuple[type, ...], transform: str) -> Any:
    """The one ``state_type`` in ``state``: the state itself, or inside a chain's (or any
    combinator's) state; ``ValueError`` naming ``transform`` when there is none or several.

    >>> find_state({"clip": (), "scale": EmptyState()}, EmptyState, "scale")
    EmptyState()
    """
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, state_type):
            found.append(node)
        elif isinstance(node, Mapping):
            for child in node.values():
                walk(child)
        elif isinstance(node, tuple):
            for child in node:
                walk(child)

    walk(state)
    if len(found) != 1:
        raise ValueError(f"expected the state of one {transform} transform, found "
                         f"{len(found)} in the state given")
    return found[0]


def select_state(state: Any, index: Sequence[int]) -> Any:
    """The state restricted to the parameters at positions ``index``.

    Example:
        >>> state = (7, ["m0", "m1", "m2"])  # a group-wide count, one entry per parameter
        >>> select_state(state, [2, 0])
        (7, ['m2', 'm0'])
    """
    if isinstance(state, list):
        return [state[i] for i in index]
    if isinstance(state, tuple):
        return _rebuild(state, (select_state(s, index) for s in state))
    if isinstance(state, dict):
        return {k: select_state(v, index) for k, v in state.items()}
    return state


def merge_state(full: Any, part: Any, index: Sequence[int]) -> Any:
    """Write a restricted state back: per-parameter entries at ``index``, group-wide values from
    ``part``.

    Example:
        >>> merge_state((7, ["m0", "m1", "m2"]), (8, ["new"]), [1])
        (8, ['m0', 'new', 'm2'])
    """
    return merge_states(full, [(part, index)])


def merge_states(full: Any, parts: Sequence[tuple[Any, Sequence[int]]]) -> Any:
    """``merge_state`` of several restricted states ``(part, index)`` at once, in one pass over
    ``full``; group-wide values come from the last part.

    Example:
        >>> merge_states((7, ["m0", "m1", "m2"]), [((8, ["a"]), [2]), ((8, ["b"]), [0])])
        (8, ['b', 'm1', 'a'])
    """
    if not parts:
        return full
    if isinstance(full, list):
        merged = list(full)
        for part, index in parts:
            for j, i in enumerate(index):
                merged[i] = part[j]
        return merged
    if isinstance(full, tuple):
        return _rebuild(full, (merge_states(f, [(part[k], index) for part, index in parts])
                               for k, f in enumerate(full)))
    if isinstance(full, dict):
        return {k: merge_states(f, [(part[k], index) for part, index in parts])
                for k, f in full.items()}
    return parts[-1][0]


def expand_state(part: Any, index: Sequence[int], size: int) -> Any:
    """A state over ``size`` parameters from one over the parameters at ``index`` (``None``
    for the others).

    Example:
        >>> expand_state((8, ["m1"]), [1], 3)
        (8, [None, 'm1', None])
    """
    if isinstance(part, list):
        full: list[Any] = [None] * size
        for j, i in enumerate(index):
            full[i] = part[j]
        return full
    if isinstance(part, tuple):
        return _rebuild(part, (expand_state(p, index, size) for p in part))
    if isinstance(part, dict):
        return {k: expand_state(v, index, size) for k, v in part.items()}
    return part


def _child_paths(state: tuple | dict) -> Iterable[tuple[str, Any]]:
    if isinstance(state, dict):
        return ((str(k), v) for k, v in state.items())
    if _is_namedtuple(state):
        return zip(state._fields, state)
    return ((str(i), v) for i, v in enumerate(state))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _flatten_entry(entry: Any, path: str, out: dict[str, Any]) -> None:
    if entry is None:
        return
    if isinstance(entry, (tuple, list, dict)):
        for key, value in _child_paths(tuple(entry) if isinstance(entry, list) else entry):
            _flatten_entry(value, _join(path, key), out)
    else:
        out[path] = entry


def flatten_state(state: Any, size: int, prefix: str = "") -> tuple[list[dict[str, Any]],
                                                                     dict[str, Any]]:
    """Flatten a state over ``size`` parameters to ``(per_parameter, group_wide)`` dicts.

    Keys are dotted paths of NamedTuple field names, dict keys and tuple positions, e.g.
    ``"adam.mu"`` for the ``mu`` field of the chain member named ``adam``. ``prefix`` (default
    none) starts every key.

    Example:
        >>> from gradchain.transforms import scale_by_adam
        >>> state = scale_by_adam().init([torch.zeros(2), torch.zeros(3)])
        >>> per_param, group = flatten_state(state, 2, prefix="adam")
        >>> sorted(per_param[1]), per_param[1]["adam.mu"].shape, group
        (['adam.mu', 'adam.nu'], torch.Size([3]), {'adam.count': 0})
    """
    per_param: list[dict[str, Any]] = [{} for _ in range(size)]
    group: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            if len(node) != size:
                raise ValueError(f"state list {path!r} has {len(node)} entries for {size} "
                                 "parameters; lists in a state hold one entry per parameter")
            for i, entry in enumerate(node):
                _flatten_entry(entry, path, per_param[i])
        elif isinstance(node, (tuple, dict)):
            for key, child in _child_paths(node):
                walk(child, _join(path, key))
        else:
            group[path] = node

    walk(state, prefix)
    return per_param, group


def _cast_like(value: Any, like: Any, key: str) -> Any:
    if isinstance(like, Tensor):
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value)
        if value.shape != like.shape:
            raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(like.shape)}")
        return value.to(device=like.device, dtype=like.dtype, copy=True)
    return value


def _unflatten_entry(like: Any, path: str, source: Mapping[str, Any]) -> Any:
    if like is None:
        return None
    if isinstance(like, dict):
        return {k: _unflatten_entry(v, _join(path, str(k)), source) for k, v in like.items()}
    if isinstance(like, (tuple, list)):
        items = [_unflatten_entry(v, _join(path, k), source)
                 for k, v in _child_paths(tuple(like) if isinstance(like, list) else like)]
        return items if isinstance(like, list) else _rebuild(like, items)
    if path not in source:
        raise KeyError(f"checkpoint lacks state entry {path!r}; was it saved by an optimizer "
                       "with the same transform?")
    return _cast_like(source[path], like, path)


def unflatten_state(template: Any, per_param: Sequence[Mapping[str, Any]],
                    group: Mapping[str, Any], prefix: str = "") -> Any:
    """Inverse of ``flatten_state``: a state shaped like ``template`` (a fresh ``init``) with
    the saved values, cast to the template's dtypes and devices.

    Example:
        >>> from gradchain.transforms import scale_by_adam
        >>> tx = scale_by_adam()
        >>> _, state = tx.update([torch.ones(2)], tx.init([torch.zeros(2)]))
        >>> per_param, group = flatten_state(state, 1)
        >>> restored = unflatten_state(tx.init([torch.zeros(2)]), per_param, group)
        >>> restored.count, restored.nu  # (1 - b2) u^2
        (1, [tensor([0.0010, 0.0010])])
    """

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, list):
            return [_unflatten_entry(entry, path, per_param[i]) for i, entry in enumerate(node)]
        if isinstance(node, dict):
            return {k: walk(v, _join(path, str(k))) for k, v in node.items()}
        if isinstance(node, tuple):
            return _rebuild(node, (walk(v, _join(path, k)) for k, v in _child_paths(node)))
        if path not in group:
            raise KeyError(f"checkpoint lacks state entry {path!r}; was it saved by an "
                           "optimizer with the same transform?")
        return _cast_like(group[path], node, path)

    return walk(template, prefix)


# ----------------------------------------------------------------------------------------------
# Validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def needs_hvp(transform: GradientTransformation, state: Any) -> bool:
    """Whether the next ``transform.update`` from ``state`` uses the ``hvp`` extra.

    Example:
        >>> from gradchain.transforms import scale, scale_by_abs_hessian_diag
        >>> tx = scale_by_abs_hessian_diag()  # a Hessian estimate on its first step
        >>> needs_hvp(tx, tx.init([torch.zeros(2)])), needs_hvp(scale(0.5), EmptyState())
        (True, False)
    """
    return transform.needs_hvp is not None and bool(transform.needs_hvp(state))


def hessian_vector_products(hvp: Callable[[Tree], Tree], updates: Tree, vectors: list[Tensor]
                            ) -> list[Tensor]:
    """``hvp`` (the ``hvp`` extra, ``v -> H v``) applied to ``vectors`` laid out like
    ``updates``: the products as a detached list, checked to be one per parameter and shaped
    like it (``ValueError`` naming the parameter otherwise).

    Example:
        >>> a = torch.tensor([1.0, 2.0])  # f = sum(a x^2) / 2, so H v = a v
        >>> hessian_vector_products(lambda v: [a * v[0]], [torch.zeros(2)], [torch.ones(2)])
        [tensor([1., 2.])]
    """
    result = leaves(hvp(as_tree(updates, vectors)))
    if len(result) != len(vectors):
        raise ValueError(f"hvp returned {len(result)} tensors for {len(vectors)} parameters")
    for name, h, v in zip(names(updates), result, vectors):
        if h.shape != v.shape:
            raise ValueError(f"hvp returned shape {tuple(h.shape)} for parameter {name!r}, "
                             f"expected {tuple(v.shape)}")
    return [h.detach() for h in result]


def _check_number(name: str, value: Any) -> bool:
    """True when ``value`` is a number to check, False for a schedule (checked when used)."""
    if callable(value):
        return False
    if isinstance(value, Tensor) and value.numel() == 1:
        return True
    if not _is_number(value):
        raise ValueError(f"{name} must be a number or a schedule (a callable of the step), "
                         f"got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return True


def check_number(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is a real, non-NaN number (schedules pass).

    Example:
        >>> check_number("lr", lambda count: 1e-3)  # a schedule is checked when used
        >>> check_number("lr", float("nan"))
        Traceback (most recent call last):
            ...
        ValueError: lr must not be NaN
    """
    _check_number(name, value)


def check_constant(transform: str, **values: Any) -> None:
    """``ValueError`` for any of ``values`` that is a schedule where ``transform`` needs a
    number (``inject_hyperparams`` schedules such a hyperparameter by rebuilding the transform).

    Example:
        >>> check_constant("sm3", eps=lambda count: 1e-8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: sm3 needs a constant eps, not a schedule; wrap sm3 in inject_hyperparams ...
    """
    for name, value in values.items():
        if callable(value):
            raise ValueError(f"{transform} needs a constant {name}, not a schedule; wrap "
                             f"{transform} in inject_hyperparams to schedule it")


def check_non_negative(name: str, value: Any) -> None:
    """``ValueError`` unless ``value >= 0`` (schedules pass).

    Example:
        >>> check_non_negative("weight_decay", -0.1)
        Traceback (most recent call last):
            ...
        ValueError: weight_decay must be >= 0, got -0.1
    """
    if _check_number(name, value) and not float(value) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_positive(name: str, value: Any) -> None:
    """``ValueError`` unless ``value > 0`` (schedules pass).

    Example:
        >>> check_positive("eps", 0.0)
        Traceback (most recent call last):
            ...
        ValueError: eps must be > 0, got 0.0
    """
    if _check_number(name, value) and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_decay(name: str, value: Any) -> None:
    """``ValueError`` unless ``0 <= value < 1`` (schedules pass).

    Example:
        >>> check_decay("b1", 0.9)
        >>> check_decay("b2", 1.0)
        Traceback (most recent call last):
            ...
        ValueError: b2 must be in [0, 1), got 1.0
    """
    if _check_number(name, value) and not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``.

    Example:
        >>> check_choice("norm", "l3", ["l1", "l2"])
        Traceback (most recent call last):
            ...
        ValueError: norm must be one of ['l1', 'l2'], got 'l3'
    """
    allowed = list(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
