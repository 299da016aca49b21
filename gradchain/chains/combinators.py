"""Combinators: transforms built from transforms.

``chain`` composes, ``masked``/``partition``/``freeze`` route parameters, ``inject_hyperparams``
schedules any numeric hyperparameter, ``multi_steps`` accumulates gradients and
``apply_if_finite`` skips steps with non-finite gradients.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    Selector,
    all_finite,
    Tree,
    add_scaled_,
    as_tree,
    check_structure,
    expand_state,
    leaves,
    merge_state,
    names,
    needs_hvp,
    resolve,
    select_state,
    selected_indices,
    subset,
    zeros_like_state,
)

__all__ = [
    "chain",
    "named_chain",
    "masked",
    "partition",
    "freeze",
    "inject_hyperparams",
    "multi_steps",
    "apply_if_finite",
]

_TREE_EXTRAS = ("grads", "val_grads")


def _check_terminal_last(members: list[tuple[str, GradientTransformation]]) -> None:
    for position, (name, tx) in enumerate(members[:-1]):
        if tx.terminal:
            raise ValueError(
                f"chain member {name!r} (position {position}) is terminal: it emits the final "
                "parameter displacement and must be the last member of the chain"
            )


def _entry(updates: Tree, params: Tree | None, extras: dict[str, Any]) -> Tree:
    """At the outermost chain: check the structure, widen 16-bit updates to float32 and record
    the raw gradient as the ``grads`` extra."""
    if "grads" in extras:
        return updates
    if params is not None:
        check_structure(updates, params)
    u = leaves(updates)
    if any(t.dtype in (torch.bfloat16, torch.float16) for t in u):
        updates = as_tree(updates, [t.float() if t.dtype in (torch.bfloat16, torch.float16)
                                    else t for t in u])
    extras["grads"] = updates
    return updates


def _sequential(members: list[tuple[str, GradientTransformation]], keyed: bool
                ) -> GradientTransformation:
    _check_terminal_last(members)

    def init(params: Tree):
        states = [(name, tx.init(params)) for name, tx in members]
        return dict(states) if keyed else tuple(s for _, s in states)

    def run(count: int, updates: Tree, state, params: Tree | None, extras: dict[str, Any]):
        """The first ``count`` members: their updates, states, and the extras after them."""
        new_states = []
        for name, tx in members[:count]:
            updates, member_state = tx.update(updates, state[name if keyed else len(new_states)],
                                              params, **extras)
            new_states.append((name, member_state))
            if tx.provides:
                extras = {**extras, **tx.provides}
        return updates, new_states, extras

    def packed(new_states: list[tuple[str, Any]]):
        return dict(new_states) if keyed else tuple(s for _, s in new_states)

    def update(updates: Tree, state, params: Tree | None = None, **extras: Any):
        updates, new_states, _ = run(len(members), _entry(updates, params, extras), state,
                                     params, extras)
        return updates, packed(new_states)

    # the trailing affine members (scalings and decays) and the member before them, which sees
    # the real updates (the affine ones do not)
    tail = 0
    while tail < len(members) and members[-1 - tail][1].affine:
        tail += 1
    fusing = len(members) - tail - 1  # that member's position, -1 when there is none
    # the members that leave their scaling and decay to the caller: the tail, and the member
    # before it if it can
    folded = tail + (fusing >= 0 and members[fusing][1].unscaled is not None)

    def unscaled(updates: Tree, state, params: Tree | None = None, **extras: Any):
        updates, new_states, extras = run(len(members) - folded,
                                          _entry(updates, params, extras), state, params, extras)
        a, b = 1.0, 0.0  # the updates so far are a·u + b·x
        for name, tx in members[len(members) - folded:]:
            updates, member_state, scale, decay = tx.unscaled(
                updates, state[name if keyed else len(new_states)], params, **extras)
            a, b = scale * a, scale * b + decay  # scale·(a·u + b·x) + decay·x
            new_states.append((name, member_state))
            if tx.provides:
                extras = {**extras, **tx.provides}
        return updates, packed(new_states), a, b

    def into_params(updates: Tree, state, params: Tree, scale: Any, decay: Any, **extras: Any):
        updates, new_states, extras = run(fusing, _entry(updates, params, extras), state,
                                          params, extras)
        name, tx = members[fusing]
        after = {**extras, **tx.provides} if tx.provides else extras
        # the member adds its own updates to the parameters, scaled and decayed as the tail
        # would (whose scaling and decay do not depend on the updates)
        a, b = 1.0, 0.0
        tail_states = []
        for position, (tail_name, tail_tx) in enumerate(members[fusing + 1:], start=fusing + 1):
            _, tail_state, factor, tail_decay = tail_tx.unscaled(
                updates, state[tail_name if keyed else position], params, **after)
            a, b = factor * a, factor * b + tail_decay
            tail_states.append((tail_name, tail_state))
        member_state = tx.into_params(updates, state[name if keyed else fusing], params,
                                      scale * a, scale * b + decay, **extras)
        return packed([*new_states, (name, member_state), *tail_states])

    return GradientTransformation(
        init, update,
        unscaled=unscaled if folded else None,
        into_params=into_params if fusing >= 0 and members[fusing][1].into_params else None,
        affine=bool(members) and all(tx.affine for _, tx in members),
        terminal=bool(members) and members[-1][1].terminal,
        leafwise=all(tx.leafwise for _, tx in members),
        elementwise=all(tx.elementwise for _, tx in members),
        needs_hvp=_any_needs_hvp([(name if keyed else i, tx)
                                  for i, (name, tx) in enumerate(members)]),
        accepts_sparse=all(tx.accepts_sparse for _, tx in members),
    )


def _any_needs_hvp(members: list[tuple[Any, GradientTransformation]]
                   ) -> Callable[[Any], bool] | None:
    """``needs_hvp`` of a combinator whose state holds the members' states under their keys."""
    asking = [(key, tx) for key, tx in members if tx.needs_hvp is not None]
    if not asking:
        return None
    return lambda state: any(needs_hvp(tx, state[key]) for key, tx in asking)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms one after the other.

    .. math::  o = T_n(\\dots T_1(u))

    Every member sees the same ``params`` and extras, plus what earlier members provide (a
    ``palm_beta2`` member sets the second-moment decay of the members after it); the outermost
    chain adds ``grads`` (the raw gradient as it entered), checks that the updates match the
    params, and widens 16-bit updates to float32. State: a tuple of the members' states
    (checkpoint keys ``"0.mu"``, ...; use ``named_chain`` for readable keys). A terminal member
    must be last.

    Example:
        >>> from gradchain.transforms import scale_by_adam, scale_by_learning_rate
        >>> tx = chain(scale_by_adam(), scale_by_learning_rate(1e-3))
    """
    members = [_member(tx) for tx in transforms]
    return _sequential([(str(i), tx) for i, tx in enumerate(members)], keyed=False)


def named_chain(*members: tuple[str, GradientTransformation]) -> GradientTransformation:
    """``chain`` with a name per member; the state is a dict ``name -> state``.

    Names become checkpoint keys (``"adam.mu"``), so they are part of a recipe's stable contract.

    Example:
        >>> from gradchain.transforms import scale_by_adam, scale_by_learning_rate
        >>> tx = named_chain(("adam", scale_by_adam()), ("lr", scale_by_learning_rate(1e-3)))
    """
    seen: set[str] = set()
    for member in members:
        if not (isinstance(member, tuple) and len(member) == 2):
            raise TypeError("named_chain takes (name, transform) pairs")
        name = member[0]
        if not isinstance(name, str) or not name or "." in name or name in seen:
            raise ValueError(f"named_chain member names must be unique non-empty strings "
                             f"without '.', got {name!r}")
        seen.add(name)
    return _sequential([(name, _member(tx, "named_chain takes (name, transform) pairs"))
                        for name, tx in members], keyed=True)


def _member(member: Any, error: str = "chain takes GradientTransformations") -> \
        GradientTransformation:
    """A chain member: a transform, or an object that becomes one (``palm_beta2``)."""
    if isinstance(member, GradientTransformation):
        return member
    as_transform = getattr(member, "as_transform", None)
    if as_transform is None:
        raise TypeError(f"{error}, got {type(member).__name__}")
    return as_transform()


def _sub_extras(extras: dict[str, Any], index: list[int]) -> dict[str, Any]:
    out = dict(extras)
    for key in _TREE_EXTRAS:
        if out.get(key) is not None:
            out[key] = subset(out[key], index)
    return out


def _run_on(inner: GradientTransformation, index: list[int], updates: Tree, state, params,
            extras: dict[str, Any]) -> tuple[list[Tensor], Any]:
    """Run ``inner`` on the parameters at ``index``; returns its output leaves and the merged
    state."""
    out, inner_state = inner.update(
        subset(updates, index), select_state(state, index),
        None if params is None else subset(params, index), **_sub_extras(extras, index))
    return leaves(out), merge_state(state, inner_state, index)


def _into(inner: GradientTransformation, updates: Tree, state, params: Tree, a: Any, b: Any,
          extras: dict[str, Any]):
    """Add ``inner``'s updates to ``params``, ``x <- x + b·x + a·o``, as an optimizer applies
    ``inner`` alone: through its ``into_params``, else its ``unscaled`` (its scale and decay
    folded into a and b), else its ``update``. Returns ``inner``'s new state."""
    if inner.into_params is not None:
        return inner.into_params(updates, state, params, a, b, **extras)
    if inner.unscaled is not None:
        out, state, scale, decay = inner.unscaled(updates, state, params, **extras)
        add_scaled_(leaves(params), leaves(out), a * scale, a * decay + b)
        return state
    out, state = inner.update(updates, state, params, **extras)
    add_scaled_(leaves(params), leaves(out), a, b)
    return state


def _run_into(inner: GradientTransformation, index: list[int], updates: Tree, state,
              params: Tree, a: Any, b: Any, extras: dict[str, Any]):
    """``_into`` on the parameters at ``index``; returns the merged state."""
    inner_state = _into(inner, subset(updates, index), select_state(state, index),
                        subset(params, index), a, b, _sub_extras(extras, index))
    return merge_state(state, inner_state, index)


def _adds_itself(tx: GradientTransformation) -> bool:
    """Whether ``tx`` applies its own updates faster than ``update`` and an addition would."""
    return tx.into_params is not None or tx.unscaled is not None


def masked(inner: GradientTransformation, mask: Selector) -> GradientTransformation:
    """Apply ``inner`` to the selected parameters; pass the others through unchanged.

    ``mask``: name patterns (``["*.weight"]``), a mapping ``pattern -> bool`` (first match
    wins), a callable ``(name, param) -> bool``, or one bool per parameter of a list tree. It is
    evaluated on ``params`` (on ``updates`` when no params are given) and must select the same
    parameters at every step. ``inner`` keeps state for the selected parameters only. In an
    optimizer the selected parameters move as ``inner`` alone would move them (its
    ``into_params`` or ``unscaled`` form, when it has one: the same numbers).

    Example:
        >>> from gradchain.transforms import add_decayed_weights
        >>> tx = masked(add_decayed_weights(0.1), lambda name, p: p.ndim >= 2)
    """

    def chosen(updates: Tree, params: Tree | None) -> list[int]:
        return [i for i, keep in enumerate(selected_indices(
            updates if params is None else params, mask)) if keep]

    def init(params: Tree):
        index = chosen(params, None)
        return expand_state(inner.init(subset(params, index)), index, len(leaves(params)))

    def update(updates: Tree, state, params: Tree | None = None, **extras: Any):
        index = chosen(updates, params)
        out, state = _run_on(inner, index, updates, state, params, extras)
        merged = leaves(updates)
        for i, o in zip(index, out):
            merged[i] = o
        return as_tree(updates, merged), state

    def into_params(updates: Tree, state, params: Tree, a: Any, b: Any, **extras: Any):
        index = chosen(updates, params)
        state = _run_into(inner, index, updates, state, params, a, b, extras)
        x, u, selected = leaves(params), leaves(updates), set(index)
        rest = [i for i in range(len(u)) if i not in selected]
        add_scaled_([x[i] for i in rest], [u[i] for i in rest], a, b)
        return state

    return GradientTransformation(init, update, terminal=inner.terminal, leafwise=inner.leafwise,
                                  elementwise=inner.elementwise and not callable(mask),
                                  needs_hvp=inner.needs_hvp, accepts_sparse=inner.accepts_sparse,
                                  into_params=into_params if _adds_itself(inner) else None)


def partition(transforms: Mapping[str, GradientTransformation], labels: Selector
              ) -> GradientTransformation:
    """Route every parameter to the transform of its label.

    ``labels``: a callable ``(name, param) -> label``, a mapping ``name pattern -> label``
    (first match wins; a dict of exact names is the same-structure tree of a dict), or one label
    per parameter of a list tree. Each transform keeps state for its own parameters only; the
    state is a dict ``label -> state``. In an optimizer each transform's parameters move by the
    numbers that transform gives alone (its ``into_params`` or ``unscaled`` form, when it has
    one: SOAP's and SM3's steps then allocate no output of a parameter's size).

    Example:
        >>> from gradchain.transforms import scale_by_adam, scale_by_sign
        >>> tx = partition({"adam": scale_by_adam(), "sign": scale_by_sign()},
        ...                {"embed.*": "sign", "*": "adam"})
    """
    if not transforms:
        raise ValueError("partition needs at least one labelled transform")

    def groups(tree: Tree) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {label: [] for label in transforms}
        for i, label in enumerate(selected_indices(tree, labels, what="labels")):
            if label not in index:
                raise ValueError(f"parameter {names(tree)[i]!r} has label {label!r}; "
                                 f"known labels: {sorted(index)}")
            index[label].append(i)
        return index

    def init(params: Tree):
        size = len(leaves(params))
        return {label: expand_state(transforms[label].init(subset(params, index)), index, size)
                for label, index in groups(params).items()}

    def update(updates: Tree, state, params: Tree | None = None, **extras: Any):
        merged = leaves(updates)
        new_state = {}
        for label, index in groups(updates if params is None else params).items():
            out, new_state[label] = _run_on(transforms[label], index, updates, state[label],
                                            params, extras)
            for i, o in zip(index, out):
                merged[i] = o
        return as_tree(updates, merged), new_state

    def into_params(updates: Tree, state, params: Tree, a: Any, b: Any, **extras: Any):
        return {label: _run_into(transforms[label], index, updates, state[label], params, a, b,
                                 extras)
                for label, index in groups(params).items()}

    members = list(transforms.values())
    return GradientTransformation(init, update,
                                  into_params=into_params if any(_adds_itself(tx)
                                                                 for tx in members) else None,
                                  terminal=any(tx.terminal for tx in members),
                                  leafwise=all(tx.leafwise for tx in members),
                                  elementwise=all(tx.elementwise for tx in members)
                                  and not callable(labels),
                                  needs_hvp=_any_needs_hvp(list(transforms.items())),
                                  accepts_sparse=all(tx.accepts_sparse for tx in members))


def freeze(mask: Selector) -> GradientTransformation:
    """Zero the updates of the selected parameters (they do not move).

    Put it last in a chain (or route with ``partition``): transforms after it would still see
    zeros and may move the parameters from their own state.

    Example:
        >>> tx = freeze(["embed.*"])
    """

    def init(params: Tree):
        return ()

    def update(updates: Tree, state, params: Tree | None = None, **extras: Any):
        tree = updates if params is None else params
        out = [torch.zeros_like(u) if keep else u
               for u, keep in zip(leaves(updates), selected_indices(tree, mask))]
        return as_tree(updates, out), state

    return GradientTransformation(init, update, leafwise=True, elementwise=not callable(mask))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schedulable(default: Any) -> bool:
    return default is inspect.Parameter.empty or _is_number(default)


class InjectState(NamedTuple):
    count: int
    hyperparams: dict[str, float]
    inner: Any


def inject_hyperparams(factory: Callable[..., GradientTransformation],
                       static_args: tuple[str, ...] = ()) -> Callable[..., GradientTransformation]:
    """Let any numeric hyperparameter of ``factory`` be a schedule of the step count.

    ``inject_hyperparams(scale_by_adam)(b1=0.9, b2=lambda count: ...)`` rebuilds the inner
    transform every step from the hyperparameters' current values, which it keeps in its state
    (``state.hyperparams``) for inspection and logging. The inner state carries over from step
    to step. A hyperparameter is scheduled when its value is a number or a callable, unless it
    is named in ``static_args`` or its default is not a number (as for ``mask=None``). Its
    flags are those of the transform built from the first step's values: where that transform
    offers ``unscaled``, so does this one (an ``affine`` one stays affine, so a chain folds it
    into its tail), and where it applies itself (``into_params`` or ``unscaled``), this one
    offers ``into_params``; each step then runs the transform built from that step's values in
    that form, with the same numbers as ``update``.

    Example:
        >>> from gradchain.transforms import scale_by_adam
        >>> from gradchain.schedules import linear_schedule
        >>> tx = inject_hyperparams(scale_by_adam)(b1=linear_schedule(0.5, 0.9, 100))
    """
    signature = inspect.signature(factory)

    def build(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hyper = dict(bound.arguments)
        numeric = {k for k, v in hyper.items() if k not in static_args
                   and _schedulable(signature.parameters[k].default)
                   and (callable(v) or _is_number(v))}

        def values(count: int) -> dict[str, Any]:
            return {k: (resolve(v, count) if k in numeric else v) for k, v in hyper.items()}

        first = factory(**values(0))

        def init(params: Tree) -> InjectState:
            current = values(0)
            return InjectState(0, {k: current[k] for k in numeric}, first.init(params))

        def advanced(state: InjectState, current: dict[str, Any], inner_state: Any
                     ) -> InjectState:
            """The state after the step that used the values ``current``."""
            return InjectState(state.count + 1, {k: current[k] for k in numeric}, inner_state)

        def update(updates: Tree, state: InjectState, params: Tree | None = None, **extras):
            current = values(state.count)
            inner = factory(**current)
            updates, inner_state = inner.update(updates, state.inner, params, **extras)
            return updates, advanced(state, current, inner_state)

        def into_params(updates: Tree, state: InjectState, params: Tree, a: Any, b: Any,
                        **extras: Any) -> InjectState:
            current = values(state.count)
            inner_state = _into(factory(**current), updates, state.inner, params, a, b, extras)
            return advanced(state, current, inner_state)

        def unscaled(updates: Tree, state: InjectState, params: Tree | None = None,
                     **extras: Any) -> tuple[Tree, InjectState, Any, Any]:
            current = values(state.count)
            updates, inner_state, a, b = factory(**current).unscaled(updates, state.inner,
                                                                     params, **extras)
            return updates, advanced(state, current, inner_state), a, b

        return GradientTransformation(init, update, terminal=first.terminal,
                                      leafwise=first.leafwise, elementwise=first.elementwise,
                                      needs_hvp=None if first.needs_hvp is None else
                                      lambda state: needs_hvp(first, state.inner),
                                      accepts_sparse=first.accepts_sparse,
                                      unscaled=unscaled if first.unscaled is not None else None,
                                      affine=first.affine,
                                      into_params=into_params if _adds_itself(first) else None)

    return build


class MultiStepsState(NamedTuple):
    mini_step: int
    accumulated: list[Tensor]
    inner: Any


def multi_steps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation: apply ``inner`` once every ``every_k`` calls, to the mean.

    .. math::  o = \\text{inner}\\Big(\\tfrac1k \\sum_{j=1}^{k} u_j\\Big)
               \\text{ on every } k\\text{-th call, } 0 \\text{ otherwise}

    ``inner`` sees the mean as its gradient (the ``grads`` extra too) and advances its own step
    count only when it runs. State: one accumulator per parameter.

    Example:
        >>> from gradchain.transforms import scale_by_learning_rate
        >>> tx = multi_steps(scale_by_learning_rate(0.1), every_k=4)
    """
    if not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"every_k must be an integer >= 1, got {every_k!r}")

    def init(params: Tree) -> MultiStepsState:
        return MultiStepsState(0, zeros_like_state(leaves(params)), inner.init(params))

    def update(updates: Tree, state: MultiStepsState, params: Tree | None = None, **extras):
        u, acc = leaves(updates), state.accumulated
        if u:
            torch._foreach_add_(acc, u)
        if state.mini_step + 1 < every_k:
            zeros = as_tree(updates, [torch.zeros_like(a) for a in acc])
            return zeros, MultiStepsState(state.mini_step + 1, acc, state.inner)
        mean = [a / every_k for a in acc]
        mean_tree = as_tree(updates, mean)
        out, inner_state = inner.update(mean_tree, state.inner, params,
                                        **{**extras, "grads": mean_tree})
        if acc:
            torch._foreach_zero_(acc)
        return out, MultiStepsState(0, acc, inner_state)

    def into_params(updates: Tree, state: MultiStepsState, params: Tree, a: Any, b: Any,
                    **extras: Any) -> MultiStepsState:
        if state.mini_step + 1 < every_k:
            out, state = update(updates, state, params, **extras)
            add_scaled_(leaves(params), leaves(out), a, b)
            return state
        acc = state.accumulated
        if acc:
            torch._foreach_add_(acc, leaves(updates))
        mean_tree = as_tree(updates, [t / every_k for t in acc])
        inner_state = _into(inner, mean_tree, state.inner, params, a, b,
                            {**extras, "grads": mean_tree})
        if acc:
            torch._foreach_zero_(acc)
        return MultiStepsState(0, acc, inner_state)

    def inner_runs_next(state: MultiStepsState) -> bool:
        return state.mini_step + 1 == every_k and needs_hvp(inner, state.inner)

    return GradientTransformation(init, update, terminal=inner.terminal,
                                  leafwise=inner.leafwise, elementwise=inner.elementwise,
                                  needs_hvp=None if inner.needs_hvp is None else inner_runs_next,
                                  into_params=into_params if _adds_itself(inner) else None)




class ApplyIfFiniteState(NamedTuple):
    consecutive_skips: int
    total_skips: int
    inner: Any


def apply_if_finite(inner: GradientTransformation, max_consecutive_skips: int = 10
                    ) -> GradientTransformation:
    """Skip steps whose updates hold a NaN or infinity; keep the inner state untouched.

    The check runs before ``inner`` (which may update its state in place), costs one host
    synchronisation per step, and outputs zeros on a skipped step. After
    ``max_consecutive_skips`` (default 10) skipped steps in a row, the next non-finite step
    raises ``FloatingPointError``, since training is then stuck. The skip counters are in the state.

    Example:
        >>> from gradchain.transforms import scale_by_adam
        >>> tx = apply_if_finite(scale_by_adam(), max_consecutive_skips=5)
    """
    if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 0:
        raise ValueError(f"max_consecutive_skips must be an integer >= 0, "
                         f"got {max_consecutive_skips!r}")

    def init(params: Tree) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(0, 0, inner.init(params))

    def update(updates: Tree, state: ApplyIfFiniteState, params: Tree | None = None, **extras):
        u = leaves(updates)
        finite = all_finite(u)
        if finite:
            out, inner_state = inner.update(updates, state.inner, params, **extras)
            return out, ApplyIfFiniteState(0, state.total_skips, inner_state)
        skips = state.consecutive_skips + 1
        if skips > max_consecutive_skips:
            raise FloatingPointError(
                f"non-finite updates on {skips} consecutive steps; lower the learning rate, "
                "check the loss for overflow, or raise max_consecutive_skips")
        zeros = as_tree(updates, [torch.zeros_like(t) for t in u])
        return zeros, ApplyIfFiniteState(skips, state.total_skips + 1, state.inner)

    def into_params(updates: Tree, state: ApplyIfFiniteState, params: Tree, a: Any, b: Any,
                    **extras: Any) -> ApplyIfFiniteState:
        if all_finite(leaves(updates)):
            inner_state = _into(inner, updates, state.inner, params, a, b, extras)
            return ApplyIfFiniteState(0, state.total_skips, inner_state)
        out, state = update(updates, state, params, **extras)  # zeros, or it raises
        add_scaled_(leaves(params), leaves(out), a, b)
        return state

    return GradientTransformation(init, update, terminal=inner.terminal,
                                  needs_hvp=None if inner.needs_hvp is None else
                                  lambda state: needs_hvp(inner, state.inner),
                                  into_params=into_params if _adds_itself(inner) else None)
