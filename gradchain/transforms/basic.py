"""Scaling transforms: the learning rate, schedules, constant factors, sign, weight decay.

The minus sign and the learning rate enter once, in ``scale_by_learning_rate``; everything else
here keeps the sign of its input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from gradchain.core import (
    EmptyState,
    GradientTransformation,
    Hyper,
    Schedule,
    Selector,
    Tree,
    as_tree,
    check_dense_real,
    check_non_negative,
    check_number,
    hoist,
    leaves,
    selected_indices,
    writable,
)

__all__ = [
    "identity",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "add_decayed_weights",
    "scale_by_sign",
]


class ScheduleState(NamedTuple):
    count: int


def _stateless(update_leaves, elementwise: bool = True, accepts_sparse: bool = False,
               unscaled=None) -> GradientTransformation:
    """A transform without state; one with ``unscaled`` is affine (a scaling or a decay)."""
    def init(params: Tree) -> EmptyState:
        return EmptyState()

    def update(updates: Tree, state: EmptyState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        if not u:
            return updates, state
        return as_tree(updates, update_leaves(u, params, extras)), state

    return GradientTransformation(init, update, leafwise=True, elementwise=elementwise,
                                  accepts_sparse=accepts_sparse, unscaled=unscaled,
                                  affine=unscaled is not None)


def _scale_leaves(u: list[torch.Tensor], factor: float | torch.Tensor, extras) -> list:
    out = writable(u, extras)
    torch._foreach_mul_(out, factor)
    return out


def identity() -> GradientTransformation:
    """Pass the updates through unchanged.

    .. math::  o = u

    Example:
        >>> tx = identity()
        >>> tx.update([torch.ones(2)], tx.init([torch.zeros(2)]))[0]
        [tensor([1., 1.])]
    """
    return _stateless(lambda u, params, extras: u, accepts_sparse=True)


def scale(factor: float) -> GradientTransformation:
    """Multiply by a constant factor.

    .. math::  o = c\\,u

    Example:
        >>> tx = scale(0.5)
        >>> tx.update([torch.ones(2)], tx.init([torch.zeros(2)]))[0]
        [tensor([0.5000, 0.5000])]
    """
    if callable(factor):
        raise ValueError("scale takes a number; use scale_by_schedule for a schedule")
    check_number("factor", factor)
    return _stateless(lambda u, params, extras: _scale_leaves(u, factor, extras),
                      accepts_sparse=True,
                      unscaled=lambda updates, state, params=None, **extras: (
                          updates, state, factor, 0.0))


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply by a schedule of the step count, without a sign change.

    .. math::  o = f(\\text{count})\\,u

    Compare ``scale_by_learning_rate``, which also flips the sign.

    Example:
        >>> tx = scale_by_schedule(lambda count: 0.5 ** count)
        >>> s = tx.init([torch.zeros(1)])
        >>> u, s = tx.update([torch.ones(1)], s); u, s = tx.update([torch.ones(1)], s); u
        [tensor([0.5000])]
    """
    if not callable(schedule):
        raise ValueError(f"schedule must be a callable of the step count, got {schedule!r}")

    def init(params: Tree) -> ScheduleState:
        return ScheduleState(count=0)

    def update(updates: Tree, state: ScheduleState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        if u:
            updates = as_tree(updates, _scale_leaves(u, hoist(schedule(state.count)), extras))
        return updates, ScheduleState(state.count + 1)

    def unscaled(updates: Tree, state: ScheduleState, params: Tree | None = None,
                 **extras: Any):
        return updates, ScheduleState(state.count + 1), hoist(schedule(state.count)), 0.0

    return GradientTransformation(init, update, leafwise=True, elementwise=True,
                                  accepts_sparse=True, unscaled=unscaled, affine=True)


def scale_by_learning_rate(learning_rate: Hyper, *, flip_sign: bool = True
                           ) -> GradientTransformation:
    """Scale by the learning rate and turn the direction into a descent step.

    .. math::  o = -\\eta(\\text{count})\\, u

    ``learning_rate`` is a number or a schedule of the step count. ``flip_sign=False`` drops the
    minus sign (for ascent; the default is True). This is where the minus sign of a descent
    method enters, once.

    Example:
        >>> tx = scale_by_learning_rate(0.1)
        >>> tx.update([torch.ones(2)], tx.init([torch.zeros(2)]))[0]
        [tensor([-0.1000, -0.1000])]
    """
    check_non_negative("learning_rate", learning_rate)
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        schedule = learning_rate
        return scale_by_schedule(lambda count: sign * schedule(count))
    return scale(sign * learning_rate)


def add_decayed_weights(weight_decay: Hyper = 0.0, mask: Selector | None = None
                        ) -> GradientTransformation:
    """Add decoupled weight decay to the updates.

    .. math::  o = u + \\lambda\\, x

    Placed before ``scale_by_learning_rate``, the parameters receive :math:`-\\eta\\lambda x`
    (PyTorch AdamW's convention: the decay is scaled by the learning rate). ``mask`` selects the
    parameters to decay: a list of name patterns (``["*.weight"]``), a mapping
    ``pattern -> bool``, a callable ``(name, param) -> bool``, or one bool per parameter of a
    list tree. Needs ``params``. Defaults: λ = ``weight_decay`` 0 (no decay), ``mask`` None
    (every parameter).

    Example:
        >>> tx = add_decayed_weights(0.1)
        >>> tx.update([torch.zeros(2)], tx.init([torch.ones(2)]), [torch.ones(2)])[0]
        [tensor([0.1000, 0.1000])]
    """
    check_non_negative("weight_decay", weight_decay)

    def add_decay(u: list[torch.Tensor], params: Tree | None, decay: float, extras) -> list:
        if not u or decay == 0:
            return u
        if any(t.layout != torch.strided for t in u):
            raise ValueError("add_decayed_weights does not support sparse gradients; use a "
                             "dense gradient (e.g. nn.Embedding(sparse=False))")
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters: "
                             "call update(updates, state, params)")
        p = leaves(params)
        chosen = list(range(len(u))) if mask is None else \
            [i for i, keep in enumerate(selected_indices(params, mask)) if keep]
        if not chosen:
            return u
        out = list(u)
        decayed = writable(u, extras, chosen)
        torch._foreach_add_(decayed, [p[i] for i in chosen], alpha=decay)
        for i, d in zip(chosen, decayed):
            out[i] = d
        return out

    def left_to_caller(updates: Tree, params: Tree | None, decay: float) -> tuple[Tree, float]:
        """``unscaled``: the updates as they are, the decay for the caller to add."""
        if params is None and decay != 0:
            raise ValueError("add_decayed_weights needs the parameters: "
                             "call update(updates, state, params)")
        return updates, decay

    by_name = not callable(mask)  # a predicate may look at shapes, which row blocks change
    if not callable(weight_decay):
        def constant_unscaled(updates: Tree, state: EmptyState, params: Tree | None = None,
                              **extras: Any):
            updates, decay = left_to_caller(updates, params, weight_decay)
            return updates, state, 1.0, decay

        return _stateless(lambda u, params, extras: add_decay(u, params, weight_decay, extras),
                          elementwise=by_name,
                          unscaled=constant_unscaled if mask is None else None)

    def init(params: Tree) -> ScheduleState:
        return ScheduleState(count=0)

    def update(updates: Tree, state: ScheduleState, params: Tree | None = None, **extras: Any):
        decay = weight_decay(state.count)
        return (as_tree(updates, add_decay(leaves(updates), params, decay, extras)),
                ScheduleState(state.count + 1))

    def unscaled(updates: Tree, state: ScheduleState, params: Tree | None = None,
                 **extras: Any):
        updates, decay = left_to_caller(updates, params, weight_decay(state.count))
        return updates, ScheduleState(state.count + 1), 1.0, decay

    return GradientTransformation(init, update, leafwise=True, elementwise=by_name,
                                  unscaled=unscaled if mask is None else None,
                                  affine=mask is None)


def scale_by_sign() -> GradientTransformation:
    """Keep only the sign of every entry (signSGD; Lion's last step).

    .. math::  o = \\operatorname{sign}(u)

    Example:
        >>> tx = scale_by_sign()
        >>> tx.update([torch.tensor([-3.0, 0.0, 2.0])], tx.init([torch.zeros(3)]))[0]
        [tensor([-1.,  0.,  1.])]
    """

    def update_leaves(u, params, extras):
        check_dense_real(u, "scale_by_sign")
        out = writable(u, extras)
        torch._foreach_sign_(out)
        return out

    return _stateless(update_leaves)
