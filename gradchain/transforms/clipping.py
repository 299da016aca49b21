"""Clipping transforms: element-wise, by the global norm, and adaptive (per parameter)."""

from __future__ import annotations

from typing import Any

import torch

from gradchain.core import (
    EmptyState,
    GradientTransformation,
    Tree,
    as_tree,
    check_constant,
    check_dense_real,
    check_non_negative,
    check_number,
    check_positive,
    leaves,
    state_dtype,
    writable,
)
from gradchain.distributed import local_shards, norms_over_shards

__all__ = ["clip", "clip_by_global_norm", "clip_by_agc", "global_norm"]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The Euclidean norm of all entries of all tensors, as a 0-d tensor (no host sync).

    Accumulated in float64 when any tensor is float64, in float32 otherwise (also for 16-bit
    tensors). DTensors (FSDP2's shards) count with all their entries, on every process.

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if not tensors:
        return torch.zeros(())
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = norms_over_shards(torch._foreach_norm(local_shards(tensors), dtype=wide), tensors)
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


def _leaf_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Frobenius norm of every tensor (of the whole tensor, for a DTensor), a 0-d tensor in
    its state dtype (16-bit tensors accumulate in and return float32): one ``_foreach_norm`` per
    dtype, no host sync."""
    dtypes = [state_dtype(t) for t in tensors]
    shards = local_shards(tensors)
    norms: dict[int, torch.Tensor] = {}
    for dtype in set(dtypes):
        index = [i for i, d in enumerate(dtypes) if d == dtype]
        norms.update(zip(index, torch._foreach_norm([shards[i] for i in index], dtype=dtype)))
    return norms_over_shards([norms[i] for i in range(len(tensors))], tensors)


#: clip_by_agc's least eps: with eps = 0, a zero update of a zero parameter was 0 * (0/0) = NaN
_EPS_FLOOR = torch.finfo(torch.float32).tiny


def clip_by_agc(clip: float = 0.1, min_param_norm: float = 1e-3, eps: float = 1e-8
                ) -> GradientTransformation:
    r"""Adaptive gradient clipping per parameter (HeavyBall's; Brock et al. 2021 clip unit-wise).

    .. math::  o = s\,u, \qquad s = \min\left(1, \frac{c \max(\lVert x \rVert,
               m)}{\max(\lVert u \rVert, \epsilon)}\right)

    for every parameter x and its update u separately (Frobenius norms), c = ``clip``
    (default 0.1), m = ``min_param_norm`` (default 1e-3; keeps zero-initialised parameters
    moving) and eps = 1e-8 (floored at float32's smallest normal number, so that a zero
    update stays zero instead of 0/0). An update is rescaled only when its norm exceeds
    ``clip`` times the parameter's; ``clip <= 0`` disables the transform (identity). Needs
    ``params``. The factors stay on the device (no host synchronisation); norms of 16-bit
    tensors accumulate in float32. A non-finite update norm makes that parameter's updates
    non-finite.

    Example:
        >>> tx = clip_by_agc(0.1)
        >>> x, g = [torch.tensor([2.0, 0.0])], [torch.tensor([6.0, 8.0])]
        >>> tx.update(g, tx.init(x), x)[0]  # s = 0.1 * 2 / 10
        [tensor([0.1200, 0.1600])]
    """
    check_constant("clip_by_agc", clip=clip, min_param_norm=min_param_norm, eps=eps)
    check_number("clip", clip)
    check_non_negative("min_param_norm", min_param_norm)
    check_non_negative("eps", eps)

    def init(params: Tree) -> EmptyState:
        return EmptyState()

    def update(updates: Tree, state: EmptyState, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        if not u or clip <= 0:
            return updates, state
        check_dense_real(u, "clip_by_agc")
        if params is None:
            raise ValueError("clip_by_agc needs the parameters: call update(updates, state, "
                             "params)")
        factors = _leaf_norms(leaves(params))
        torch._foreach_maximum_(factors, min_param_norm)
        torch._foreach_mul_(factors, clip)
        update_norms = _leaf_norms(u)
        torch._foreach_maximum_(update_norms, max(eps, _EPS_FLOOR))
        factors = torch._foreach_div(factors, update_norms)
        torch._foreach_clamp_max_(factors, 1.0)
        out = writable(u, extras)
        torch._foreach_mul_(local_shards(out), factors)
        return as_tree(updates, out), state

    return GradientTransformation(init, update, leafwise=True)
