"""Hessian-vector products through the optimizer: create_graph, closure, errors, release."""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import NamedTuple

import pytest
import torch

from gradchain import chain
from gradchain.core import GradientTransformation, as_tree, leaves
from gradchain.optimizers import SGD, ChainOptimizer
from gradchain.transforms import scale_by_learning_rate

A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.0, -1.0, 4.0]], dtype=torch.float64)


class ProbeState(NamedTuple):
    count: int
    products: list


def probe_every_other_step() -> GradientTransformation:
    """Records H·1 on even counts (0, 2, ...) and passes the updates through."""

    def init(params):
        return ProbeState(0, [None] * len(leaves(params)))

    def update(updates, state, params=None, **extras):
        products = state.products
        if state.count % 2 == 0:
            hvp = extras["hvp"]
            products = leaves(hvp(as_tree(updates, [torch.ones_like(u) for u in leaves(updates)])))
        return updates, ProbeState(state.count + 1, products)

    return GradientTransformation(init, update, needs_hvp=lambda s: s.count % 2 == 0)


def _setup(lr: float = 0.1):
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    optimizer = ChainOptimizer([x], chain(probe_every_other_step(), scale_by_learning_rate(lr)))
    return x, optimizer


def _loss(x):
    return 0.5 * x @ A @ x


def test_create_graph_path_gives_the_hessian_vector_product():
    x, optimizer = _setup()
    assert optimizer.needs_hvp()
    _loss(x).backward(create_graph=True)
    optimizer.step()
    products = optimizer.chain_state()[0].products
    torch.testing.assert_close(products[0], A @ torch.ones(3, dtype=torch.float64))


def test_closure_runs_with_the_graph_only_on_curvature_steps():
    x, optimizer = _setup()
    seen = []

    def closure():
        optimizer.zero_grad()
        loss = _loss(x)
        loss.backward()
        seen.append(x.grad.grad_fn is not None)
        return loss

    for _ in range(4):
        optimizer.step(closure)
    assert seen == [True, False, True, False]
    torch.testing.assert_close(optimizer.chain_state()[0].products[0],
                               A @ torch.ones(3, dtype=torch.float64))


def test_closure_and_create_graph_paths_give_the_same_trajectory():
    x1, opt1 = _setup()
    x2, opt2 = _setup()
    for _ in range(6):
        opt1.zero_grad()
        _loss(x1).backward(create_graph=opt1.needs_hvp())
        opt1.step()

        def closure():
            opt2.zero_grad()
            loss = _loss(x2)
            loss.backward()
            return loss

        opt2.step(closure)
    assert torch.equal(x1.detach(), x2.detach())


def test_missing_graph_raises_a_clear_error_before_anything_changes():
    x, optimizer = _setup()
    before = x.detach().clone()
    _loss(x).backward()
    with pytest.raises(ValueError, match=r"create_graph=True.*closure"):
        optimizer.step()
    assert torch.equal(x.detach(), before)
    assert optimizer.chain_state() is None


def test_graph_is_released_after_the_step():
    x, optimizer = _setup()
    for _ in range(3):
        optimizer.zero_grad()
        hidden = A @ x  # an intermediate the double-backward graph holds on to
        watcher = weakref.ref(hidden)
        (0.5 * x @ hidden).backward(create_graph=True)
        del hidden
        optimizer.step()
        gc.collect()
        assert x.grad.grad_fn is None
        assert watcher() is None


def test_no_memory_growth_over_curvature_steps():
    """Even when gradients accumulate across steps (no zero_grad), each step's graph goes."""
    x, optimizer = _setup(lr=1e-3)

    def closure():
        loss = _loss(x)
        loss.backward()
        return loss

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(4):
        optimizer.step(closure)
    baseline = live_tensors()
    for _ in range(20):
        optimizer.step(closure)
    assert live_tensors() <= baseline


def test_sparse_gradients_reach_transforms_that_accept_them():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = ChainOptimizer(embedding.parameters(), chain(scale_by_learning_rate(0.5)))
    before = embedding.weight.detach().clone()
    embedding(torch.tensor([1, 4, 4])).sum().backward()
    optimizer.step()
    moved = (embedding.weight.detach() != before).any(dim=1)
    assert moved.tolist() == [i in (1, 4) for i in range(10)]
    torch.testing.assert_close(embedding.weight.detach()[4], before[4] - 1.0)


def test_sparse_gradients_are_refused_by_dense_recipes():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = SGD(embedding.parameters(), lr=0.1, momentum=0.9)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        optimizer.step()


@pytest.mark.parametrize("use_closure", [True, False])
def test_a_gradient_constant_in_the_parameters_has_zero_hessian_rows(use_closure):
    """loss = x^T A x / 2 + c.b + 0 * e: b's and e's gradients carry no graph (they do not
    depend on the parameters), so H v is A v_x for x and 0 for b and e, and the step runs."""
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    e = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
    optimizer = ChainOptimizer([x, b, e], chain(probe_every_other_step(),
                                                scale_by_learning_rate(0.1)))
    c = torch.tensor([3.0, -1.0], dtype=torch.float64)

    def closure():
        optimizer.zero_grad()
        loss = _loss(x) + c @ b + e.sum()
        loss.backward(create_graph=not use_closure)
        return loss

    if use_closure:
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()
    hx, hb, he = optimizer.chain_state()[0].products
    torch.testing.assert_close(hx, A @ torch.ones(3, dtype=torch.float64))
    assert torch.equal(hb, torch.zeros(2, dtype=torch.float64)) and he.shape == (0,)
    torch.testing.assert_close(b.detach(), torch.ones(2, dtype=torch.float64) - 0.1 * c)
