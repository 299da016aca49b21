"""Clipping transforms: element-wise and by the global norm."""

from __future__ import annotations

from typing import Any

import torch

from gradchain.core import (
    EmptyState,
    GradientTransformation,
    Tree,
    as_tree,
    check_dense_real,
    check_positive,
    leaves,
    writable,
)

__all__ = ["clip", "clip_by_global_norm", "global_norm"]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The Euclidean norm of all entries of all tensors, as a 0-d tensor (no host sync).

    Accumulated in float64 when any tensor is float64, in float32 otherwise (also for 16-bit
    tensors).

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if not tensors:
        return torch.zeros(())
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(tensors, dtype=wide)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def clip(max_delta: float) -> GradientTransformation:
    """Clip every entry to ``[-max_delta, max_delta]``.

    .. math::  o = \\max(-c, \\min(c, u))

    Example:
        >>> tx = clip(1.0)
        >>> tx.update([torch.tensor([-3.0, 0.5, 2.0])], tx.init([torch.zeros(3)]))[0]
        [tensor([-1.0000,  0.5000,  1.0000])]
    """
    if callable(max_delta):
        raise ValueError("max_delta must be a number; wrap clip in inject_hyperparams to "
                         "schedule it")
    check_positive("max_delta", max_delta)

    def init(params: Tree) -> EmptyState:
        return EmptyState()

    def update(updates: Tree, state: EmptyState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        if not u:
            return updates, state
        check_dense_real(u, "clip")
        out = writable(u, extras)
        torch._foreach_clamp_min_(out, -max_delta)
        torch._foreach_clamp_max_(out, max_delta)
        return as_tree(updates, out), state

    return GradientTransformation(init, update, leafwise=True, elementwise=True)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale all updates together so that their global norm is at most ``max_norm``.

    .. math::  o = u \\cdot \\min\\left(1, \\frac{c}{\\lVert u \\rVert_2}\\right),
               \\quad \\lVert u \\rVert_2 = \\sqrt{\\textstyle\\sum_i \\lVert u_i \\rVert^2}

    The norm runs over every parameter handed to ``update`` (all of a parameter group in an
    optimizer), so this transform is not leafwise. The factor stays on the device: no host
    synchronisation. A non-finite norm makes the updates non-finite (guard with
    ``apply_if_finite``).

    Example:
        >>> tx = clip_by_global_norm(1.0)
        >>> tx.update([torch.tensor([3.0, 4.0])], tx.init([torch.zeros(2)]))[0]
        [tensor([0.6000, 0.8000])]
    """
    if callable(max_norm):
        raise ValueError("max_norm must be a number; wrap clip_by_global_norm in "
                         "inject_hyperparams to schedule it")
    check_positive("max_norm", max_norm)

    def init(params: Tree) -> EmptyState:
        return EmptyState()

    def update(updates: Tree, state: EmptyState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        if not u:
            return updates, state
        check_dense_real(u, "clip_by_global_norm")
        factor = torch.clamp(max_norm / global_norm(u), max=1.0)
        out = writable(u, extras)
        torch._foreach_mul_(out, factor.to(out[0].device))
        return as_tree(updates, out), state

    return GradientTransformation(init, update)
