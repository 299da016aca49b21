"""Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism) and data-parallel
closures: what the optimizers and transforms need to stay exact, or to refuse clearly.

FSDP2 keeps every parameter as a DTensor whose local shard is a block of its rows, with the
gradient sharded the same way. Three cases follow:

- An element-wise chain computes every entry from the same entry of its inputs and state, so
  ``ChainOptimizer`` runs it on the local shards (``local_shard``) as they are.
- A transform that reduces over entries (a global norm, a dot product) computes its sums on
  the local shards and completes them across the processes (``sum_over_shards``,
  ``norms_over_shards``): one collective per step and layout.
- A transform that needs whole matrices or the gradient's graph refuses DTensors at ``init``
  (``check_whole``), saying what to use instead.

Under ``DistributedDataParallel``, steps that need the gradient's graph (Hessian-vector
products) or a gradient taken with ``torch.autograd.grad`` cannot be synchronised; the
optimizers run such closures inside ``refusing_data_parallel``, which turns the DDP forward
into a clear error.

This module imports only torch; without ``torch.distributed``, nothing is a DTensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # a build without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "is_dtensor",
    "is_sharded",
    "local_shard",
    "local_shards",
    "sum_over_shards",
    "norms_over_shards",
    "check_whole",
    "check_gradient_layout",
    "refusing_data_parallel",
    "WHOLE_INSTEAD",
    "CURVATURE_INSTEAD",
]

_ON_SHARDS = ("the element-wise ones (sgd, adam, adamw, adamw-inplace, laprop, adopt, sfadamw, "
              "palm-sfadamw), hd-sgd, hd-adam, or gradchain.mechanize around one of them")

#: What ``check_whole`` suggests by default, for transforms that need whole parameters.
WHOLE_INSTEAD = ("use DistributedDataParallel (every process holds whole parameters) for this "
                 f"model, or an optimizer that runs on shards: {_ON_SHARDS}")

#: What transforms that need Hessian-vector products (ESGD, RTHO, MARTHE) suggest.
CURVATURE_INSTEAD = ("train it on one process: it does not run under DistributedDataParallel "
                     "either, which cannot synchronise gradients that keep their graph. On "
                     f"sharded parameters use an optimizer that runs on shards: {_ON_SHARDS}")


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor.

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    return DTensor is not None and isinstance(tensor, DTensor)


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor split across processes along some mesh dimension
    (a DTensor replicated everywhere is not).

    Example:
        >>> is_sharded(torch.zeros(2))
        False
    """
    return is_dtensor(tensor) and any(p.is_shard() for p in tensor.placements)


def local_shard(tensor: Tensor, like: Tensor | None = None) -> Tensor:
    """The part of ``tensor`` this process holds: a DTensor's local tensor (it shares the
    DTensor's storage, so writing into it writes the DTensor), any other tensor itself.

    With ``like``, a DTensor laid out differently from the DTensor ``like`` is redistributed
    to ``like``'s layout first, so that the two local shards hold the same entries.

    Example:
        >>> x = torch.ones(2)
        >>> local_shard(x) is x
        True
    """
    if not is_dtensor(tensor):
        return tensor
    if is_dtensor(like) and (tensor.device_mesh, tensor.placements) != (like.device_mesh,
                                                                         like.placements):
        tensor = tensor.redistribute(like.device_mesh, like.placements)
    return tensor.to_local()


def local_shards(tensors: Iterable[Tensor], like: Iterable[Tensor] | None = None
                 ) -> list[Tensor]:
    """``local_shard`` of every tensor (laid out as the matching tensor of ``like``, if given).

    Example:
        >>> local_shards([torch.ones(1), torch.zeros(2)])
        [tensor([1.]), tensor([0., 0.])]
    """
    if like is None:
        return [local_shard(t) for t in tensors]
    return [local_shard(t, ref) for t, ref in zip(tensors, like)]


def sum_over_shards(values: Sequence[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """Sums over local shards, completed to sums over whole tensors.

    ``values[i]`` is a sum over the entries of ``local_shard(tensors[i])`` (a dot product, a
    squared norm). For a sharded DTensor, the result adds the values of all the processes that
    hold its shards, over the mesh dimensions along which it is sharded (along replicated ones,
    every process holds the same entries). The values of all tensors with the same mesh and
    placements go in one collective, which every process of the mesh must join, in the same
    order. Values of other tensors come back as they are.

    Example:
        >>> sum_over_shards([torch.tensor(2.0)], [torch.ones(2)])  # not sharded: as it is
        [tensor(2.)]
    """
    out = list(values)
    layouts: dict[tuple[Any, Any], list[int]] = {}
    for i, tensor in enumerate(tensors):
        if is_sharded(tensor):
            layouts.setdefault((tensor.device_mesh, tensor.placements), []).append(i)
    for (mesh, placements), index in layouts.items():
        partial = [Partial() if p.is_shard() else Replicate() for p in placements]
        stacked = torch.stack([values[i] for i in index])
        total = DTensor.from_local(stacked, mesh, partial, run_check=False).full_tensor()
        for j, i in enumerate(index):
            out[i] = total[j]
    return out


def norms_over_shards(norms: Sequence[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """2-norms of local shards (``norms[i]`` of ``local_shard(tensors[i])``), completed to the
    norms of the whole tensors; those of tensors that are not sharded come back as they are.

    Example:
        >>> norms_over_shards([torch.tensor(5.0)], [torch.ones(2)])
        [tensor(5.)]
    """
    if not any(is_sharded(t) for t in tensors):
        return list(norms)
    squares = sum_over_shards([n.square() for n in norms], tensors)
    return [s.sqrt() if is_sharded(t) else n for n, s, t in zip(norms, squares, tensors)]


def check_whole(params: Iterable[Tensor], transform: str, reason: str,
                instead: str = WHOLE_INSTEAD) -> None:
    """``ValueError`` if a parameter is a DTensor: ``transform`` needs what ``reason`` says,
    which a shard does not hold; the message ends with ``instead``. Transforms call it from
    ``init``, so the first step fails before anything moves.

    Example:
        >>> check_whole([torch.zeros(2, 2)], "soap_precondition", "it needs Gram matrices")
    """
    if any(is_dtensor(p) for p in params):
        raise ValueError(f"{transform} does not run on DTensor parameters (FSDP2's "
                         f"fully_shard, tensor parallelism): {reason}. Instead, {instead}")


def check_gradient_layout(name: str, param: Tensor) -> None:
    """``ValueError`` unless the gradient of a DTensor parameter is a DTensor with the
    parameter's mesh and placements (as FSDP2 makes it), so that their local shards match.

    Example:
        >>> p = torch.zeros(2, requires_grad=True); p.grad = torch.ones(2)
        >>> check_gradient_layout("w", p)
    """
    grad = param.grad
    if not is_dtensor(param) or grad is None:
        return
    if not is_dtensor(grad) or (grad.device_mesh, grad.placements) != (param.device_mesh,
                                                                       param.placements):
        layout = (grad.placements if is_dtensor(grad) else "a plain tensor")
        raise ValueError(f"parameter {name!r} is a DTensor with placements "
                         f"{param.placements}, its gradient is {layout}; the optimizer needs "
                         "the gradient sharded as the parameter (as FSDP2's fully_shard "
                         "makes it): redistribute it first")


@contextmanager
def refusing_data_parallel(message: str) -> Iterator[None]:
    """Inside, the forward of a ``torch.nn.parallel.DistributedDataParallel`` module raises
    ``ValueError(message)`` before DDP does anything. For closures whose gradients DDP cannot
    synchronise: a backward with ``create_graph=True`` fails in DDP's reducer, and a gradient
    taken with ``torch.autograd.grad`` is never averaged across processes.

    Example:
        >>> with refusing_data_parallel("no DDP here"):
        ...     _ = torch.nn.Linear(2, 1)(torch.ones(2))  # other modules run as usual
    """
    def refuse(module: torch.nn.Module, args: Any) -> None:
        if isinstance(module, DistributedDataParallel):
            raise ValueError(message)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()
