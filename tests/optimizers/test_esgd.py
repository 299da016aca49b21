"""ESGD-M: the recipe ``chains.esgd.esgd_m`` (ALGORITHMS.md §8.1, §11 items 7-10) driven with an
explicit ``hvp``, and the ``ESGD`` optimizer driven by ``backward(create_graph=True)`` or a
closure."""

from __future__ import annotations

import copy
import doctest
import io
import math

import pytest
import torch

from gradchain.chains import esgd as esgd_chains
from gradchain.chains.esgd import esgd_m
from gradchain.core import flatten_state, needs_hvp
from gradchain.optimizers import esgd as esgd_optimizers
from gradchain.optimizers.esgd import ESGD
from gradchain.transforms.curvature import is_hvp_step

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning")

class Quadratic:
    """f(x) = c (x^T A x / 2 + b^T x) at x = s y, as a function of y: gradient and hvp."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, loss_scale: float = 1.0,
                 param_scale: float = 1.0):
        self.a, self.b, self.c, self.s = a, b, loss_scale, param_scale

    def grad(self, y: torch.Tensor) -> torch.Tensor:
        return self.c * self.s * (self.a @ (self.s * y) + self.b)

    def hvp(self, v):
        return [self.c * self.s ** 2 * (self.a @ v[0])]


def run_recipe(tx, problem: Quadratic, y0: torch.Tensor, steps: int,
               probes: list | None = None) -> torch.Tensor:
    y = [y0.clone()]
    state = tx.init(y)

    def hvp(v):
        if probes is not None:
            probes.append(v[0].clone())
        return problem.hvp(v)

    for _ in range(steps):
        extras = {"hvp": hvp} if needs_hvp(tx, state) else {}
        out, state = tx.update([problem.grad(y[0])], state, y, **extras)
        y[0] = y[0] + out[0]
    return y[0]


def dense_spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=gen, dtype=F64)
    return q @ q.T / n + torch.diag(torch.linspace(0.1, 2.0, n, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Closed forms (§11 items 7, 10)

@pytest.mark.parametrize("a", [0.01, 1.0, 100.0])
def test_three_steps_on_an_isotropic_quadratic_shrink_by_the_warmed_up_lr(a):
    x0 = torch.tensor([1.0, 2.0], dtype=F64)
    tx = esgd_m(0.5, v=0.0, eps=0.0, weight_decay=0.0)
    x = run_recipe(tx, Quadratic(a * torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)), x0, 3)
    factor = math.prod(1 - 0.5 * (1 - 0.99 ** s) for s in (1, 2, 3))
    assert factor == pytest.approx(0.9704705, abs=5e-8)
    torch.testing.assert_close(x, x0 * factor, rtol=1e-14, atol=0)


def test_negative_curvature_moves_away_from_the_maximum():
    x0 = torch.tensor([1.0, 2.0], dtype=F64)
    tx = esgd_m(0.5, v=0.0, eps=0.0)
    x = run_recipe(tx, Quadratic(-2.0 * torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)),
                   x0, 3)
    factor = math.prod(1 + 0.5 * (1 - 0.99 ** s) for s in (1, 2, 3))
    assert factor == pytest.approx(1.0300730, abs=5e-8)
    torch.testing.assert_close(x, x0 * factor, rtol=1e-14, atol=0)


def test_warmup_factor_reaches_63_percent_at_100_steps_and_95_at_300():
    # H = I and a constant unit gradient: the step is -lr (1 - 0.99^t) exactly
    tx = esgd_m(1.0, v=0.0, eps=0.0)
    state = tx.init([torch.zeros(1, dtype=F64)])
    steps = []
    for _ in range(300):
        extras = {"hvp": lambda v: v} if needs_hvp(tx, state) else {}
        out, state = tx.update([torch.ones(1, dtype=F64)], state, [torch.zeros(1, dtype=F64)],
                               **extras)
        steps.append(-out[0].item())
    assert steps[0] == pytest.approx(0.01, rel=1e-12)
    assert steps[99] == pytest.approx(0.6340, abs=5e-5)
    assert steps[299] == pytest.approx(0.9510, abs=5e-5)


def test_lr_warmup_zero_turns_the_warmup_off():
    tx = esgd_m(0.25, v=0.0, eps=0.0, lr_warmup=0.0)
    out, _ = tx.update([torch.ones(1, dtype=F64)], tx.init([torch.zeros(1, dtype=F64)]),
                       [torch.zeros(1, dtype=F64)], hvp=lambda v: v)
    assert out[0].item() == -0.25


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_weight_decay_is_decoupled_and_scaled_by_the_warmed_up_lr(lam):
    # f = a |x|^2 / 2, nu = 0, eps = 0: x <- x - s_t (a x / |a| + lam x) = x (1 - s_t (1 + lam));
    # an L2 decay (lam x added to the gradient) would give x (1 - s_t (1 + lam / a)) instead
    a, lr = 4.0, 0.5
    x0 = torch.tensor([1.0, -3.0], dtype=F64)
    tx = esgd_m(lr, v=0.0, eps=0.0, weight_decay=lam)
    x = run_recipe(tx, Quadratic(a * torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)), x0, 5)
    decoupled = math.prod(1 - lr * (1 - 0.99 ** s) * (1 + lam) for s in range(1, 6))
    coupled = math.prod(1 - lr * (1 - 0.99 ** s) * (1 + lam / a) for s in range(1, 6))
    torch.testing.assert_close(x, x0 * decoupled, rtol=1e-14, atol=0)
    assert abs(decoupled - coupled) > 1e-3


# ---------------------------------------------------------------------------------------------
# The seed's update rule, by hand (§8.1)

@pytest.mark.parametrize("v", [None, 0.7, 1.0])
def test_recipe_follows_the_seed_update_rule(v):
    """x <- x (1 - lam s_t) - s_t q_t / (sqrt(D-hat_t) + eps), with the recipe's probes."""
    n, lr, (b1, b2), eps, lam = 5, 0.3, (0.9, 0.95), 1e-3, 0.02
    every, warmup = 3, 4
    a = dense_spd(n, seed=1)
    b = torch.linspace(-1.0, 1.0, n, dtype=F64)
    problem = Quadratic(a, b)
    x0 = torch.linspace(2.0, -1.0, n, dtype=F64)
    probes: list[torch.Tensor] = []
    tx = esgd_m(lr, (b1, b2), v, eps=eps, weight_decay=lam, update_d_every=every,
                d_warmup=warmup)
    final = run_recipe(tx, problem, x0, 30, probes)

    nu = b1 if v is None else v
    x, m, d, k = x0.clone(), torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64), 0
    used = iter(probes)
    for t in range(1, 31):
        g = a @ x + b
        m = b1 * m + (1 - b1) * g
        q = (nu * m + (1 - nu) * g) / (1 - nu * b1 ** t)
        if t <= warmup or (t - warmup) % every == 0:
            z = next(used)
            assert set(z.unique().tolist()) <= {-1.0, 1.0}
            d, k = b2 * d + (1 - b2) * (a @ z) ** 2, k + 1
        s_t = lr * (1 - 0.99 ** t)
        x = x * (1 - lam * s_t) - s_t * q / ((d / (1 - b2 ** k)).sqrt() + eps)
    assert next(used, None) is None and k == 4 + 8
    torch.testing.assert_close(final, x, rtol=1e-12, atol=1e-14)


def test_recipe_asks_for_hvp_on_the_schedule():
    tx = esgd_m(update_d_every=10, d_warmup=20)
    state = tx.init([torch.zeros(2)])
    asked = []
    for t in range(1, 61):
        asked.append(needs_hvp(tx, state))
        extras = {"hvp": lambda v: v} if asked[-1] else {}
        _, state = tx.update([torch.ones(2)], state, [torch.zeros(2)], **extras)
    assert [t for t, yes in enumerate(asked, start=1) if yes] == list(range(1, 21)) + [30, 40,
                                                                                       50, 60]


# ---------------------------------------------------------------------------------------------
# Scale invariance (§2.6, §11 item 8)

@pytest.mark.parametrize("loss_scale,param_scale", [(1000.0, 1.0), (0.01, 1.0), (1.0, 10.0),
                                                    (1.0, 0.1)])
def test_trajectory_is_invariant_to_loss_and_parameter_scale(loss_scale, param_scale):
    a = dense_spd(4, seed=2)
    assert (a - torch.diag(torch.diag(a))).abs().max() > 0.1  # non-diagonal
    b = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=F64)
    x0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    reference = run_recipe(esgd_m(eps=0.0), Quadratic(a, b), x0, 25)
    scaled = run_recipe(esgd_m(eps=0.0), Quadratic(a, b, loss_scale, param_scale),
                        x0 / param_scale, 25)
    assert (reference - x0).abs().max() > 0.1  # it moved
    torch.testing.assert_close(param_scale * scaled, reference, rtol=1e-12, atol=0)


def test_eps_breaks_the_scale_invariance():
    a = dense_spd(4, seed=2)
    b = torch.ones(4, dtype=F64)
    x0 = torch.ones(4, dtype=F64)
    reference = run_recipe(esgd_m(eps=1e-4), Quadratic(a, b), x0, 25)
    tiny = run_recipe(esgd_m(eps=1e-4), Quadratic(a, b, loss_scale=1e-6), x0, 25)
    assert (tiny - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Recipe contract

def test_state_keys_are_the_member_names():
    tx = esgd_m()
    per_param, group = flatten_state(tx.init([torch.zeros(2), torch.zeros(3)]), 2)
    assert set(per_param[0]) == {"momentum.momentum", "curvature.d"}
    assert set(group) == {"momentum.count", "curvature.count", "curvature.hvp_count",
                          "curvature.rng_state", "warmup.count"}


@pytest.mark.parametrize("kwargs,name", [
    ({"lr_warmup": 1.0}, "lr_warmup"), ({"lr_warmup": -0.5}, "lr_warmup"),
    ({"betas": (0.9,)}, "betas"), ({"betas": (1.0, 0.999)}, "beta"),
    ({"betas": (0.9, 1.0)}, "b2"), ({"v": 1.5}, "v"), ({"v": -0.1}, "v"),
    ({"eps": -1.0}, "eps"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"update_d_every": 0}, "update_d_every"), ({"d_warmup": 0}, "d_warmup"),
    ({"learning_rate": -1.0}, "learning_rate"),
])
def test_recipe_rejects_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        esgd_m(**kwargs)


def test_docstring_examples_run():
    for module in (esgd_chains, esgd_optimizers):
        result = doctest.testmod(module, extraglobs={"torch": torch})
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ---------------------------------------------------------------------------------------------
# The optimizer

def make_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1)).double()
    inputs = torch.randn(64, 4, generator=gen, dtype=F64)
    targets = torch.sin(inputs.sum(dim=1, keepdim=True))
    return model, inputs, targets


def loss_of(model, inputs, targets):
    return torch.nn.functional.mse_loss(model(inputs), targets)


def train_with_create_graph(model, opt, inputs, targets, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, inputs, targets)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()
        losses.append(loss.item())
    for p in model.parameters():  # break the reference cycle of create_graph gradients
        p.grad = None
    return losses


def test_optimizer_defaults_are_the_seed_defaults():
    model, _, _ = make_problem()
    opt = ESGD(model.parameters())
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["v"], group["eps"], group["weight_decay"],
            group["update_d_every"], group["d_warmup"], group["lr_warmup"]) == \
        (1.0, (0.9, 0.999), None, 1e-4, 0.0, 10, 20, 0.99)


def test_optimizer_rejects_invalid_hyperparameters():
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match="update_d_every"):
        ESGD(model.parameters(), update_d_every=0)
    with pytest.raises(ValueError, match="lr_warmup"):
        ESGD(model.parameters(), lr_warmup=1.0)


def test_should_create_graph_before_the_first_step():
    model, _, _ = make_problem()
    assert ESGD(model.parameters()).should_create_graph()


def test_plain_backward_on_a_curvature_step_raises_the_fix_and_moves_nothing():
    model, inputs, targets = make_problem()
    before = copy.deepcopy(model.state_dict())
    opt = ESGD(model.parameters(), lr=0.5)
    loss_of(model, inputs, targets).backward()
    with pytest.raises(ValueError, match="create_graph=True"):
        opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_optimizer_trains_with_create_graph_gradients():
    model, inputs, targets = make_problem()
    opt = ESGD(model.parameters(), lr=0.5)
    losses = train_with_create_graph(model, opt, inputs, targets, 60)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_optimizer_matches_the_recipe_driven_by_hand():
    model, inputs, targets = make_problem()
    reference = copy.deepcopy(model)
    opt = ESGD(model.parameters(), lr=0.5, weight_decay=0.01, update_d_every=3, d_warmup=4)
    train_with_create_graph(model, opt, inputs, targets, 12)

    params = dict(reference.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    tx = esgd_m(0.5, weight_decay=0.01, update_d_every=3, d_warmup=4)
    state = tx.init({n: params[n].detach() for n in names})
    for _ in range(12):
        loss = loss_of(reference, inputs, targets)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)

        def hvp(v):
            hv = torch.autograd.grad(grads, [params[n] for n in names],
                                     grad_outputs=[v[n] for n in names], retain_graph=True)
            return dict(zip(names, hv))

        with torch.no_grad():
            out, state = tx.update({n: g.detach() for n, g in zip(names, grads)}, state,
                                   {n: params[n] for n in names}, hvp=hvp)
            for n in names:
                params[n].add_(out[n])
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_a_closure_gives_the_create_graph_trajectory():
    model, inputs, targets = make_problem()
    twin = copy.deepcopy(model)
    opt = ESGD(model.parameters(), lr=0.5, update_d_every=2, d_warmup=3)
    train_with_create_graph(model, opt, inputs, targets, 10)

    twin_opt = ESGD(twin.parameters(), lr=0.5, update_d_every=2, d_warmup=3)

    def closure():
        twin_opt.zero_grad(set_to_none=True)
        loss = loss_of(twin, inputs, targets)
        loss.backward()
        return loss

    for _ in range(10):
        twin_opt.step(closure)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)


def test_should_create_graph_follows_the_schedule():
    model, inputs, targets = make_problem()
    opt = ESGD(model.parameters(), lr=0.1, update_d_every=4, d_warmup=3)
    asked = []
    for _ in range(20):
        asked.append(opt.should_create_graph())
        train_with_create_graph(model, opt, inputs, targets, 1)
    assert asked == [is_hvp_step(t, update_d_every=4, d_warmup=3) for t in range(1, 21)]
    assert opt.state_dict()["state"][0]["curvature.hvp_count"] == sum(asked)


def test_state_dict_round_trip_continues_bit_for_bit():
    model, inputs, targets = make_problem()
    opt = ESGD(model.parameters(), lr=0.5, weight_decay=0.01, update_d_every=3, d_warmup=4)
    train_with_create_graph(model, opt, inputs, targets, 5)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "curvature.rng_state" in saved["opt"]["state"][0]

    twin, _, _ = make_problem(seed=1)
    twin.load_state_dict(saved["model"])
    twin_opt = ESGD(twin.parameters(), lr=0.5, weight_decay=0.01, update_d_every=3, d_warmup=4)
    twin_opt.load_state_dict(saved["opt"])

    train_with_create_graph(model, opt, inputs, targets, 12)  # crosses curvature steps 7, 10
    train_with_create_graph(twin, twin_opt, inputs, targets, 12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    ours, theirs = opt.state_dict()["state"], twin_opt.state_dict()["state"]
    for i in ours:
        for key, value in ours[i].items():
            other = theirs[i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) \
                else value == other, key


def test_optimizer_weight_decay_is_decoupled_and_scaled_by_the_warmed_up_lr():
    a, lr, lam = 4.0, 0.5, 0.1
    x = torch.nn.Parameter(torch.tensor([1.0, -3.0], dtype=F64))
    opt = ESGD([x], lr=lr, v=0.0, eps=0.0, weight_decay=lam)
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        (0.5 * a * x.square().sum()).backward(create_graph=opt.should_create_graph())
        opt.step()
    x.grad = None
    factor = math.prod(1 - lr * (1 - 0.99 ** s) * (1 + lam) for s in range(1, 6))
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, -3.0], dtype=F64) * factor,
                               rtol=1e-14, atol=0)


def test_should_create_graph_is_true_when_any_group_estimates_the_curvature():
    model, inputs, targets = make_problem()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = ESGD([{"params": first, "update_d_every": 5, "d_warmup": 2},
                {"params": second, "update_d_every": 4, "d_warmup": 3}], lr=0.1)
    asked = []
    for _ in range(16):
        asked.append(opt.should_create_graph())
        train_with_create_graph(model, opt, inputs, targets, 1)
    expected = [is_hvp_step(t, update_d_every=5, d_warmup=2)
                or is_hvp_step(t, update_d_every=4, d_warmup=3) for t in range(1, 17)]
    assert asked == expected
    state = opt.state_dict()["state"]
    assert state[0]["curvature.hvp_count"] == sum(
        is_hvp_step(t, update_d_every=5, d_warmup=2) for t in range(1, 17))
    assert state[len(first)]["curvature.hvp_count"] == sum(
        is_hvp_step(t, update_d_every=4, d_warmup=3) for t in range(1, 17))
