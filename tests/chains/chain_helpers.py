"""Trees and state walkers shared by the combinator tests."""

from __future__ import annotations

import torch


def params(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small named tree: a 3x2 matrix ``w`` and a vector ``b``."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g, dtype=dtype),
            "b": torch.randn(3, generator=g, dtype=dtype)}


def grads(step: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The gradients of step ``step``, in the structure of ``params``."""
    return params(dtype, seed=100 + step)


def clone(tree):
    return {k: v.clone() for k, v in tree.items()} if isinstance(tree, dict) \
        else [v.clone() for v in tree]


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor in a state, in order."""
    out: list[torch.Tensor] = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, (list, tuple)):
            for n in node:
                walk(n)
        elif isinstance(node, dict):
            for n in node.values():
                walk(n)

    walk(state)
    return out
