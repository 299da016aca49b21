"""HDSGD, HDAdam, RTHO and MARTHE as torch optimizers: training, the learned learning rate in
param_groups, the validation gradient (val_closure / val_grads / param_extras), Hessian-vector
products through the adapter, hooks, and checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from gradchain.chains.combinators import chain
from gradchain.core import needs_hvp
from gradchain.optimizers.adapter import ChainOptimizer
from gradchain.optimizers.hypergrad import HDSGD, MARTHE, RTHO, HDAdam
from gradchain.transforms.basic import scale_by_learning_rate
from gradchain.transforms.hypergrad import hypergrad_lr, hypergrad_lr_value

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning")

F64 = torch.float64


def _problem(seed: int = 0):
    """A small regression task: a 2-layer MLP, a training set and a validation set."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(4, 1, generator=gen, dtype=F64)
    xs = torch.randn(64, 4, generator=gen, dtype=F64)
    vx = torch.randn(32, 4, generator=gen, dtype=F64)
    return model, (xs, torch.sin(xs @ w)), (vx, torch.sin(vx @ w))


def _mse(model, data):
    x, y = data
    return torch.nn.functional.mse_loss(model(x), y)


def _batches(data, steps, seed=2, size=16):
    gen = torch.Generator().manual_seed(seed)
    x, y = data
    for _ in range(steps):
        index = torch.randint(0, len(x), (size,), generator=gen)
        yield x[index], y[index]


def _train(model, opt, train, val, steps, seed=2, use_closure=False):
    """Minibatch training; returns the training losses on the full set before and after."""
    validated = isinstance(opt, (RTHO, MARTHE))
    for batch in _batches(train, steps, seed):
        def closure(batch=batch):
            opt.zero_grad(set_to_none=True)
            loss = _mse(model, batch)
            loss.backward()
            return loss

        kwargs = {"val_closure": lambda: _mse(model, val)} if validated else {}
        if use_closure:
            opt.step(closure, **kwargs)
        else:
            opt.zero_grad(set_to_none=True)
            _mse(model, batch).backward(create_graph=opt.needs_hvp())
            opt.step(**kwargs)


MAKERS = {
    "hdsgd": lambda ps: HDSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4, hypergrad_lr=1e-3),
    "hdadam": lambda ps: HDAdam(ps, lr=1e-2, hypergrad_lr=1e-5),
    "rtho": lambda ps: RTHO(ps, lr=0.05, hyper_lr=1e-3),
    "marthe": lambda ps: MARTHE(ps, lr=0.05, hyper_lr=1e-3, weight_decay=1e-4),
    "marthe_adam": lambda ps: MARTHE(ps, lr=1e-2, hyper_lr=1e-5, dynamics="adam", eps=1e-4,
                                     mu="auto"),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_trains_and_shows_the_learned_lr_next_to_the_configured_one(name):
    model, train, val = _problem()
    opt = MAKERS[name](model.parameters())
    configured = opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["learned_lr"] == configured
    before = _mse(model, train).item()
    _train(model, opt, train, val, steps=40)
    after = _mse(model, train).item()
    group = opt.param_groups[0]
    assert after < 0.5 * before
    assert group["lr"] == configured
    assert group["learned_lr"] != configured
    assert group["learned_lr"] == hypergrad_lr_value(opt.chain_state(0)) > 0


def test_named_parameters_work_with_the_validation_gradient():
    model, train, val = _problem()
    opt = MARTHE(list(model.named_parameters()), lr=0.05, hyper_lr=1e-3)
    before = _mse(model, train).item()
    _train(model, opt, train, val, steps=20, use_closure=True)
    assert _mse(model, train).item() < before
    assert opt.param_groups[0]["param_names"][0] == "0.weight"
    assert opt.param_groups[0]["learned_lr"] != 0.05


def test_the_learned_lr_key_does_not_rebuild_the_transform():
    model, train, val = _problem()
    opt = MARTHE(model.parameters(), lr=0.05, hyper_lr=1e-3)
    _train(model, opt, train, val, steps=2)
    built = opt._transform(0)[0]
    _train(model, opt, train, val, steps=2, seed=3)
    assert opt._transform(0)[0] is built


def test_each_group_learns_its_own_lr():
    model, train, val = _problem()
    opt = HDSGD([{"params": model[0].parameters()},
                 {"params": model[2].parameters(), "lr": 0.02}], lr=0.05, hypergrad_lr=1e-3)
    _train(model, opt, train, val, steps=5)
    first, second = (g["learned_lr"] for g in opt.param_groups)
    assert first != second and first != 0.05 and second != 0.02
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.02]


@pytest.mark.parametrize("cls", [RTHO, MARTHE])
def test_a_missing_validation_gradient_is_a_clear_error_after_the_first_step(cls):
    assert cls.uses_validation and not hasattr(HDSGD, "uses_validation")
    model, train, _ = _problem()
    opt = cls(model.parameters(), lr=0.05, first_order=True) if cls is MARTHE else \
        cls(model.parameters(), lr=0.05)
    _mse(model, train).backward()
    opt.step()  # the first step needs no validation gradient
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _mse(model, train).backward(create_graph=opt.needs_hvp())
    with pytest.raises(ValueError, match="val_closure"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_val_closure_and_precomputed_val_grads_agree_and_do_not_touch_grad():
    runs = []
    for precomputed in (False, True):
        model, train, val = _problem()
        opt = MARTHE(model.parameters(), lr=0.05, hyper_lr=1e-2)
        for batch in _batches(train, 4):
            opt.zero_grad()
            _mse(model, batch).backward(create_graph=opt.needs_hvp())
            grads = [p.grad.detach().clone() for p in model.parameters()]
            if precomputed:
                val_grads = torch.autograd.grad(_mse(model, val), list(model.parameters()))
                opt.step(val_grads=val_grads)
            else:
                opt.step(val_closure=lambda: _mse(model, val))
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        runs.append(([p.detach().clone() for p in model.parameters()],
                     opt.param_groups[0]["learned_lr"]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert runs[0][1] == runs[1][1] != 0.05


def test_closure_and_create_graph_paths_are_bitwise_equal():
    runs = []
    for use_closure in (False, True):
        model, train, val = _problem()
        opt = RTHO(model.parameters(), lr=0.05, hyper_lr=1e-3, dynamics="sgd_momentum")
        _train(model, opt, train, val, steps=5, use_closure=use_closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_rtho_tangent_through_the_adapter_matches_the_transform_with_the_exact_hvp():
    # f = x^T A x / 2 - c^T x: H = A; validation loss E = |x - 1|^2 / 2
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]], dtype=F64)
    c = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    x = torch.nn.Parameter(torch.tensor([0.3, -0.2, 1.0], dtype=F64))
    opt = RTHO([x], lr=0.1, hyper_lr=1e-3, dynamics="adam", grad_clip=None)
    tx = hypergrad_lr("marthe", 0.1, 1e-3, mu=1.0, dynamics="adam")
    y = [x.detach().clone()]
    state = tx.init(y)
    for _ in range(5):
        opt.zero_grad()
        (0.5 * x @ a @ x - c @ x).backward(create_graph=opt.needs_hvp())
        opt.step(val_closure=lambda: 0.5 * (x - 1).square().sum())
        extras = {"hvp": lambda v: [a @ v[0]]} if needs_hvp(tx, state) else {}
        if state.count:
            extras["val_grads"] = [y[0] - 1]
        out, state = tx.update([a @ y[0] - c], state, y, **extras)
        y = [y[0] + out[0]]
    torch.testing.assert_close(x.detach(), y[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(opt.chain_state(0)["hypergrad"].tangent.x[0], state.tangent.x[0],
                               rtol=1e-13, atol=0)
    assert opt.param_groups[0]["learned_lr"] == pytest.approx(float(state.lr), rel=1e-14)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_save_load_continue_is_bit_identical(name):
    model, train, val = _problem()
    opt = MAKERS[name](model.parameters())
    _train(model, opt, train, val, steps=4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    _train(model, opt, train, val, steps=4, seed=5)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, _, _ = _problem()
    resumed.load_state_dict(checkpoint["model"])
    fresh = MAKERS[name](resumed.parameters())
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.param_groups[0]["learned_lr"] == checkpoint["optimizer"]["param_groups"][0][
        "learned_lr"] != fresh.param_groups[0]["lr"]
    _train(resumed, fresh, train, val, steps=4, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted))
    assert fresh.param_groups[0]["learned_lr"] == opt.param_groups[0]["learned_lr"]


def test_loading_reads_the_learned_lr_from_the_state_not_the_saved_view():
    model, train, val = _problem()
    opt = HDSGD(model.parameters(), lr=0.05, hypergrad_lr=1e-3)
    _train(model, opt, train, val, steps=3)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["learned_lr"]  # e.g. written by a ChainOptimizer with the same recipe
    fresh = HDSGD(model.parameters(), lr=0.05, hypergrad_lr=1e-3)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["learned_lr"] == opt.param_groups[0]["learned_lr"] != 0.05


def test_state_dict_keys_are_readable():
    model, train, val = _problem()
    opt = MARTHE(model.parameters(), lr=0.05, mu="auto")
    _train(model, opt, train, val, steps=2)
    keys = set(opt.state_dict()["state"][0])
    assert {"step", "hypergrad.lr", "hypergrad.hyper_lr", "hypergrad.mu", "hypergrad.mu_acc",
            "hypergrad.count", "hypergrad.tangent.x", "hypergrad.tangent.momentum",
            "hypergrad.dynamics.momentum", "hypergrad.prev_grad"} == keys


def test_step_hooks_run_once_per_step():
    ChainOptimizer([torch.nn.Parameter(torch.zeros(1))], scale_by_learning_rate(0.1))
    model, train, val = _problem()
    opt = MARTHE(model.parameters(), lr=0.05)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    _train(model, opt, train, val, steps=3)
    assert len(calls) == 3


def test_chain_optimizer_param_extras_reach_the_chain_per_group():
    a = torch.nn.Parameter(torch.ones(2, dtype=F64))
    b = torch.nn.Parameter(torch.ones(3, dtype=F64))
    tx = chain(hypergrad_lr("marthe", 0.1, 0.5, mu=0.0))
    opt = ChainOptimizer([{"params": [a]}, {"params": [b]}], tx)
    for step in range(2):
        opt.zero_grad()
        (a.sum() + b.sum()).backward()
        val = [torch.ones(2, dtype=F64), None]  # None: b's validation gradient is zero
        opt.step(param_extras={"val_grads": val} if step else None)
    # Z^x = -g = -1 in both groups: eta_a = 0.1 + 0.5 * 2, eta_b = 0.1
    assert hypergrad_lr_value(opt.chain_state(0)) == pytest.approx(1.1, rel=1e-15)
    assert hypergrad_lr_value(opt.chain_state(1)) == 0.1
    with pytest.raises(ValueError, match="one tensor"):
        opt.step(param_extras={"val_grads": [None]})


@pytest.mark.parametrize("make,match", [
    (lambda ps: HDSGD(ps, lr=-0.1), "init_lr"),
    (lambda ps: HDAdam(ps, hypergrad_lr=-1.0), "hyper_lr"),
    (lambda ps: MARTHE(ps, mu=2.0), "mu"),
    (lambda ps: MARTHE(ps, alpha=-1e-6), "alpha"),
    (lambda ps: RTHO(ps, dynamics="sgd", nesterov=True), "nesterov"),
    (lambda ps: HDSGD(ps, lr=0.1, nesterov=True), "nesterov"),
])
def test_invalid_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.zeros(2))])
