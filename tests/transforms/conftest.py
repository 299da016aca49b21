"""Shared pieces of the transform tests: random gradients and the optax step-by-step comparison.

optax (with jax in float64) is the reference for every standard transform; it is an optional
test dependency, so the tests that need it take the ``optax`` fixture, which skips when it is
missing. jax is imported once per session.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SHAPES = {"w": (3, 4), "b": (5,), "s": ()}  # a matrix, a vector and a 0-d leaf


@pytest.fixture(scope="session")
def optax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return pytest.importorskip("optax")


def random_tree(gen: torch.Generator, kind: str = "list", dtype=torch.float64,
                spread: bool = True, zeros: bool = True, scale: float = 1.0):
    """Random leaves of SHAPES: magnitudes spread over ~4 decades and ~15% exact zeros, so that
    eps terms, signs and clipping all matter somewhere."""
    leaves = []
    for shape in SHAPES.values():
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if spread:
            x = x * torch.exp(2.0 * torch.randn(shape, generator=gen, dtype=torch.float64))
        if zeros:
            x = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.15,
                            torch.zeros_like(x), x)
        leaves.append((scale * x).to(dtype))
    return as_kind(leaves, kind)


def as_kind(leaves, kind: str):
    return dict(zip(SHAPES, leaves)) if kind == "dict" else list(leaves)


def leaves_of(tree):
    return list(tree.values()) if isinstance(tree, dict) else list(tree)


def to_jax(tree):
    import jax.numpy as jnp

    if isinstance(tree, dict):
        return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}
    return [jnp.asarray(v.numpy()) for v in tree]


def clone_tree(tree):
    if isinstance(tree, dict):
        return {k: v.clone() for k, v in tree.items()}
    return [v.clone() for v in tree]


@pytest.fixture(scope="session")
def trees() -> SimpleNamespace:
    """The tree helpers above, for the test modules (test directories are not packages)."""
    return SimpleNamespace(SHAPES=SHAPES, random_tree=random_tree, as_kind=as_kind,
                           leaves_of=leaves_of, clone_tree=clone_tree)


@pytest.fixture
def assert_matches_optax(optax) -> Callable:
    """Run one of our transforms and an optax transform on the same random float64 gradients
    (and fresh random parameters every step) and compare every output, step by step."""

    def check(ours, theirs, *, steps: int = 20, kind: str = "list", seed: int = 0,
              rtol: float = 1e-12, atol: float = 1e-300, scale: float = 1.0,
              dtype=torch.float64) -> None:
        gen = torch.Generator().manual_seed(seed)
        params = random_tree(gen, kind, dtype)
        state, ref_state = ours.init(params), theirs.init(to_jax(params))
        for step in range(steps):
            grads = random_tree(gen, kind, dtype, scale=scale)
            params = random_tree(gen, kind, dtype)
            out, state = ours.update(clone_tree(grads), state, params)
            ref, ref_state = theirs.update(to_jax(grads), ref_state, to_jax(params))
            assert type(out) is type(grads)
            if kind == "dict":
                assert list(out) == list(grads)
            # jax rebuilds dicts with sorted keys: compare leaf by name
            refs = [ref[k] for k in SHAPES] if kind == "dict" else ref
            for name, a, b in zip(SHAPES, leaves_of(out), refs):
                assert a.dtype == dtype, f"step {step}, leaf {name}: dtype {a.dtype}"
                np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=rtol, atol=atol,
                                           err_msg=f"step {step}, leaf {name!r}")

    return check
