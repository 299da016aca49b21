"""hypergrad_lr (ALGORITHMS.md §7, §11 items 26-28) and the recipes hd_sgd, hd_adam, rtho and
marthe: tangents against forward-mode AD, the one-step and HD closed forms, parity with the
plain dynamics, the hyper-learning-rate and automatic-mu rules, safeguards and validation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import grad, jvp

from gradchain.chains.combinators import chain
from gradchain.chains.hypergrad import hd_adam, hd_sgd, marthe, rtho
from gradchain.core import flatten_state, needs_hvp, unflatten_state
from gradchain.transforms.hypergrad import LR_FLOOR_FACTOR, hypergrad_lr, hypergrad_lr_value

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# A 6-D non-quadratic training loss over two leaves, w (2x2) and b (2,)

A_IN = torch.tensor([1.0, -0.5], dtype=F64)
TARGET = torch.tensor([0.3, -0.2], dtype=F64)
W0 = torch.tensor([[0.4, -0.7], [0.2, 0.9]], dtype=F64)
B0 = torch.tensor([-0.3, 0.5], dtype=F64)
LAMBDA = 0.01


def train_loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r = torch.tanh(w @ A_IN + b) - TARGET
    return r.square().sum() + 0.1 * w.pow(4).sum() + torch.log(torch.cosh(b + 0.2)).sum()


def val_loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.sin(w).sum() - 0.5) ** 2 + (b - 0.1).square().sum()


train_grad = grad(train_loss, argnums=(0, 1))
val_grad = grad(val_loss, argnums=(0, 1))


def hvp_at(w: torch.Tensor, b: torch.Tensor):
    """``v -> H v`` of the training loss at (w, b), by forward-over-reverse AD."""
    w, b = w.clone(), b.clone()

    def hvp(v):
        return dict(zip(("w", "b"), jvp(train_grad, (w, b), (v["w"], v["b"]))[1]))

    return hvp


def one_step(w, b, buffers, eta, dynamics, t, nesterov=False, m=0.9, b1=0.9, b2=0.999,
             eps=1e-8):
    """One step of the dynamics as a pure function: the reference the tangents are checked
    against (L2 weight decay LAMBDA, PyTorch momentum, optax-eps Adam)."""
    d = [gi + LAMBDA * xi for gi, xi in zip(train_grad(w, b), (w, b))]
    if dynamics == "sgd":
        direction = d
    elif dynamics == "sgd_momentum":
        buffers = [m * bi + di for bi, di in zip(buffers, d)]
        direction = [di + m * bi for di, bi in zip(d, buffers)] if nesterov else buffers
    else:
        first = [b1 * mi + (1 - b1) * di for mi, di in zip(buffers[:2], d)]
        second = [b2 * vi + (1 - b2) * di * di for vi, di in zip(buffers[2:], d)]
        buffers = first + second
        direction = [(mi / (1 - b1 ** t)) / (torch.sqrt(vi / (1 - b2 ** t)) + eps)
                     for mi, vi in zip(first, second)]
    return w - eta * direction[0], b - eta * direction[1], buffers


def initial_buffers(dynamics):
    zeros = [torch.zeros_like(W0), torch.zeros_like(B0)]
    return {"sgd": [], "sgd_momentum": zeros, "adam": zeros + [z.clone() for z in zeros]}[
        dynamics]


DYNAMICS = [("sgd", False), ("sgd_momentum", False), ("sgd_momentum", True), ("adam", False)]
DYNAMICS_IDS = ["sgd", "momentum", "nesterov", "adam"]


def fixed_lr_marthe(dynamics, nesterov, mu, eta=0.1):
    options = {"momentum": 0.9, "nesterov": nesterov} if dynamics == "sgd_momentum" else {}
    return hypergrad_lr("marthe", eta, 0.0, mu=mu, dynamics=dynamics, weight_decay=LAMBDA,
                        **options)


def run_marthe(tx, steps):
    """Drive ``tx`` on the training loss with exact HVPs; yields (params, state) per step."""
    params = {"w": W0.clone(), "b": B0.clone()}
    state = tx.init(params)
    for _ in range(steps):
        g = dict(zip(("w", "b"), train_grad(params["w"], params["b"])))
        extras = {"val_grads": {k: torch.zeros_like(v) for k, v in params.items()}}
        if needs_hvp(tx, state):
            extras["hvp"] = hvp_at(params["w"], params["b"])
        out, state = tx.update(g, state, params, **extras)
        params = {k: params[k] + out[k] for k in params}
        yield params, state


def flat(tree):
    return torch.cat([t.reshape(-1) for t in (tree.values() if isinstance(tree, dict) else tree)])


def assert_relative(actual, expected, rtol, what):
    scale = expected.norm().item()
    error = (actual - expected).norm().item() / (scale if scale > 0 else 1.0)
    assert error <= rtol, f"{what}: relative error {error:.3g}"


# ---------------------------------------------------------------------------------------------
# Tangents (§7.5.2, §7.8, §11 item 27)

@pytest.mark.parametrize("dynamics,nesterov", DYNAMICS, ids=DYNAMICS_IDS)
def test_rtho_tangent_is_the_forward_mode_derivative_of_the_unrolled_optimizer(dynamics,
                                                                                nesterov):
    steps = 8

    def unrolled(eta):
        w, b, buffers = W0, B0, initial_buffers(dynamics)
        points = []
        for t in range(1, steps + 1):
            w, b, buffers = one_step(w, b, buffers, eta, dynamics, t, nesterov)
            points.append(torch.cat([w.reshape(-1), b]))
        return torch.stack(points)

    eta = torch.tensor(0.1, dtype=F64)
    xs, derivatives = jvp(unrolled, (eta,), (torch.ones_like(eta),))
    run = run_marthe(fixed_lr_marthe(dynamics, nesterov, mu=1.0), steps)
    for t, (params, state) in enumerate(run):
        assert_relative(flat(params), xs[t], 1e-13, f"x at step {t + 1}")
        assert_relative(flat(state.tangent.x), derivatives[t], 1e-10, f"Z^x at step {t + 1}")


@pytest.mark.parametrize("mu", [0.0, 0.6])
@pytest.mark.parametrize("dynamics,nesterov", DYNAMICS, ids=DYNAMICS_IDS)
def test_discounted_tangent_is_mu_times_the_carried_jacobian_plus_b(dynamics, nesterov, mu):
    # Z_{t+1} = mu A_t Z_t + B_t is jvp of one step at s_t with tangents (mu Z_t, d eta = 1)
    w, b, buffers = W0, B0, initial_buffers(dynamics)
    z = [torch.zeros_like(t) for t in (w, b, *buffers)]
    eta = torch.tensor(0.1, dtype=F64)
    run = run_marthe(fixed_lr_marthe(dynamics, nesterov, mu=mu), 6)
    for t, (params, state) in enumerate(run, start=1):
        def step(w, b, *buffers_and_eta, t=t):
            *buffers, lr = buffers_and_eta
            w, b, buffers = one_step(w, b, list(buffers), lr, dynamics, t, nesterov)
            return (w, b, *buffers)

        tangents = tuple(mu * zi for zi in z) + (torch.ones_like(eta),)
        primal, z = jvp(step, (w, b, *buffers, eta), tangents)
        w, b, *buffers = primal
        z = list(z)
        assert_relative(flat(state.tangent.x), torch.cat([z[0].reshape(-1), z[1]]), 1e-12,
                        f"Z^x at step {t}")
        if dynamics == "sgd_momentum":  # Z^b of b_t
            assert_relative(flat(state.tangent.momentum), flat(z[2:]), 1e-12, f"Z^b, step {t}")


def test_first_call_tangent_is_minus_the_first_direction():
    tx = hypergrad_lr("marthe", 0.1, 0.0, mu=1.0, dynamics="sgd_momentum", momentum=0.5)
    g = [torch.tensor([2.0, -1.0], dtype=F64)]
    _, state = tx.update(g, tx.init([torch.zeros(2, dtype=F64)]), [torch.zeros(2, dtype=F64)])
    assert torch.equal(state.tangent.x[0], -g[0]) and torch.equal(state.tangent.momentum[0],
                                                                  torch.zeros(2, dtype=F64))


# ---------------------------------------------------------------------------------------------
# One-step hypergradient (mu = 0, first_order) and the hyper-step


@pytest.mark.parametrize("options", [{"mu": 0.0}, {"mu": 0.9, "first_order": True}],
                         ids=["mu0", "first_order"])
def test_one_step_hypergradient_moves_eta_by_beta_times_val_grad_dot_last_direction(options):
    # Z^x_{t+1} = -d_t, so eta_{t+1} = eta_t - beta <e_{t+1}, Z^x_{t+1}> = eta_t + beta <e, d_t>
    beta = 0.05
    tx = hypergrad_lr("marthe", 0.1, beta, dynamics="sgd", weight_decay=LAMBDA, **options)
    assert tx.needs_hvp is not None
    params = {"w": W0.clone(), "b": B0.clone()}
    state, eta, last_d = tx.init(params), 0.1, None
    for t in range(1, 7):
        assert not needs_hvp(tx, state)
        g = dict(zip(("w", "b"), train_grad(params["w"], params["b"])))
        e = dict(zip(("w", "b"), val_grad(params["w"], params["b"])))
        if last_d is not None:
            eta = eta + beta * sum((e[k] * last_d[k]).sum().item() for k in e)
        out, state = tx.update(g, state, params, val_grads=e if t > 1 else None)
        assert hypergrad_lr_value(state) == pytest.approx(eta, rel=1e-14, abs=0)
        last_d = {k: g[k] + LAMBDA * params[k] for k in g}
        for k in out:
            torch.testing.assert_close(out[k], -eta * last_d[k], rtol=1e-14, atol=0)
        params = {k: params[k] + out[k] for k in params}
    assert eta != pytest.approx(0.1, rel=1e-3)  # the test moved eta


def test_hyper_step_uses_the_tangent_and_then_the_new_eta():
    beta = 0.02
    tx = hypergrad_lr("marthe", 0.1, beta, mu=1.0, dynamics="sgd")
    params = {"w": W0.clone(), "b": B0.clone()}
    state = tx.init(params)
    for t in range(1, 5):
        g = dict(zip(("w", "b"), train_grad(params["w"], params["b"])))
        e = dict(zip(("w", "b"), val_grad(params["w"], params["b"])))
        z = {k: v.clone() for k, v in zip(("w", "b"), state.tangent.x)}
        eta = hypergrad_lr_value(state) - beta * sum((e[k] * z[k]).sum().item() for k in e)
        extras = {"val_grads": e, "hvp": hvp_at(params["w"], params["b"])} if t > 1 else {}
        out, state = tx.update(g, state, params, **extras)
        assert hypergrad_lr_value(state) == pytest.approx(eta, rel=1e-14, abs=0)
        torch.testing.assert_close(out["b"], -eta * g["b"], rtol=1e-14, atol=0)
        params = {k: params[k] + out[k] for k in params}


# ---------------------------------------------------------------------------------------------
# hyper_lr = 0: the plain dynamics (§7.8). lr and decay are powers of two, so that -lr * d is
# exact and x + (-lr d) rounds as torch's fused x.add_(d, alpha=-lr): bitwise comparisons.

LR, DECAY = 2.0 ** -4, 2.0 ** -5


def _mlp_grads(model, data):
    x, y = data
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _two_models():
    torch.manual_seed(3)
    ours = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    theirs = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen))
               for _ in range(10)]
    return ours, theirs, batches


def _run_transform(tx, model, batches, val=True):
    params = list(model.parameters())
    state = tx.init([p.detach() for p in params])
    for t, data in enumerate(batches, start=1):
        g = _mlp_grads(model, data)
        extras = {"val_grads": [torch.zeros_like(p) for p in params]} if val and t > 1 else {}
        out, state = tx.update(g, state, [p.detach() for p in params], **extras)
        with torch.no_grad():
            for p, o in zip(params, out):
                p.add_(o)
    return state


def _run_torch(optimizer, model, batches):
    for data in batches:
        optimizer.zero_grad()
        x, y = data
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_zero_hyper_lr_marthe_is_torch_sgd_bitwise(momentum, nesterov):
    ours, theirs, batches = _two_models()
    options = {"dynamics": "sgd_momentum", "momentum": momentum, "nesterov": nesterov} \
        if momentum else {"dynamics": "sgd"}
    state = _run_transform(hypergrad_lr("marthe", LR, 0.0, mu=0.0, weight_decay=DECAY,
                                        **options), ours, batches)
    reference = _run_torch(torch.optim.SGD(theirs.parameters(), lr=LR, momentum=momentum,
                                           nesterov=nesterov, weight_decay=DECAY), theirs,
                           batches)
    for i, (a, b) in enumerate(zip(ours.parameters(), theirs.parameters())):
        assert torch.equal(a, b)
        if momentum:
            assert torch.equal(state.dynamics.momentum[i], reference.state[b]["momentum_buffer"])


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True)])
def test_zero_hyper_lr_hd_sgd_is_torch_sgd_bitwise(momentum, nesterov):
    ours, theirs, batches = _two_models()
    state = _run_transform(hd_sgd(LR, 0.0, momentum, nesterov, DECAY), ours, batches, val=False)
    _run_torch(torch.optim.SGD(theirs.parameters(), lr=LR, momentum=momentum, nesterov=nesterov,
                               weight_decay=DECAY), theirs, batches)
    assert hypergrad_lr_value(state) == LR
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_zero_hyper_lr_marthe_adam_is_optax_convention_adam():
    b1, b2, eps = 0.8, 0.99, 1e-3
    tx = hypergrad_lr("marthe", 0.01, 0.0, mu=0.0, dynamics="adam", b1=b1, b2=b2, eps=eps,
                      weight_decay=DECAY)
    x = [torch.tensor([1.0, -2.0, 0.5], dtype=F64)]
    state = tx.init(x)
    m = v = torch.zeros(3, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 9):
        g = torch.randn(3, generator=gen, dtype=F64)
        d = g + DECAY * x[0]
        m, v = b1 * m + (1 - b1) * d, b2 * v + (1 - b2) * d * d
        expected = -0.01 * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        out, state = tx.update([g], state, x, val_grads=[torch.zeros(3, dtype=F64)])
        torch.testing.assert_close(out[0], expected, rtol=1e-14, atol=0)
        x = [x[0] + out[0]]


def test_hd_adam_with_zero_hyper_lr_is_adam_in_adamhds_eps_convention():
    # AdaTune's AdamHD (old torch.optim.Adam): sqrt(c2) / c1 * m / (sqrt(v) + eps); eps large,
    # so that it differs from eps added to sqrt(v-hat) (scale_by_adam, today's torch.optim.Adam)
    b1, b2, eps, lr = 0.9, 0.999, 1e-2, 1e-2
    tx = hd_adam(lr, 0.0, b1, b2, eps, DECAY)
    params = {"w": W0.clone(), "b": B0.clone()}
    state = tx.init(params)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(x) for k, x in params.items()}
    for t in range(1, 9):
        g = dict(zip(("w", "b"), train_grad(params["w"], params["b"])))
        d = {k: g[k] + DECAY * params[k] for k in g}
        m = {k: b1 * m[k] + (1 - b1) * d[k] for k in d}
        v = {k: b2 * v[k] + (1 - b2) * d[k] ** 2 for k in d}
        out, state = tx.update(g, state, params)
        for k in out:
            adamhd = -lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m[k] / (v[k].sqrt() + eps)
            torch.testing.assert_close(out[k], adamhd, rtol=1e-13, atol=0)
            optax = -lr * (m[k] / (1 - b1 ** t)) / ((v[k] / (1 - b2 ** t)).sqrt() + eps)
            assert not torch.allclose(out[k], optax, rtol=1e-3, atol=0)
        params = {k: params[k] + out[k] for k in params}


# ---------------------------------------------------------------------------------------------
# HD (§7.4, §11 item 26)

@pytest.mark.parametrize("make", [lambda: hd_sgd(0.1, hyper_lr=0.01),
                                  lambda: chain(hypergrad_lr("hd", 0.1, 0.01))],
                         ids=["recipe", "transform"])
def test_hd_sgd_closed_form_on_x_squared(make):
    tx = make()
    x = [torch.tensor([1.0], dtype=F64)]
    state = tx.init(x)
    expected = [(0.1, 0.8), (0.132, 0.5888)]  # (eta_t, x_t): h_1 = 0, h_2 = 1.6 * 2 = 3.2
    for eta, point in expected:
        out, state = tx.update([2 * x[0]], state, x)
        x = [x[0] + out[0]]
        assert hypergrad_lr_value(state) == pytest.approx(eta, rel=1e-15)
        assert x[0].item() == pytest.approx(point, rel=1e-15)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.7, True)])
def test_hd_sgd_follows_baydins_recursion_with_momentum_and_l2(momentum, nesterov):
    beta, lam = 0.003, 0.05
    tx = hd_sgd(0.1, beta, momentum, nesterov, lam)
    params = {"w": W0.clone(), "b": B0.clone()}
    state = tx.init(params)
    eta, buf, u_prev = 0.1, {k: torch.zeros_like(v) for k, v in params.items()}, None
    for _ in range(6):
        g = dict(zip(("w", "b"), train_grad(params["w"], params["b"])))
        d = {k: g[k] + lam * params[k] for k in g}
        if u_prev is not None:
            eta += beta * sum((d[k] * u_prev[k]).sum().item() for k in d)
        buf = {k: momentum * buf[k] + d[k] for k in d}
        u = {k: d[k] + momentum * buf[k] for k in d} if nesterov else \
            (buf if momentum else d)
        out, state = tx.update(g, state, params)
        assert hypergrad_lr_value(state) == pytest.approx(eta, rel=1e-13)
        for k in out:
            torch.testing.assert_close(out[k], -eta * u[k], rtol=1e-12, atol=1e-15)
        params = {k: params[k] + out[k] for k in params}
        u_prev = u
    assert eta != pytest.approx(0.1, rel=1e-4)


def test_hd_adam_takes_one_global_hyper_step_per_step_and_starts_at_eta0():
    beta, lr, eps = 1e-3, 0.01, 1e-8
    tx = hd_adam(lr, beta, 0.9, 0.999, eps)
    params = {"w": W0.clone(), "b": B0.clone()}
    state = tx.init(params)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    eta, u_prev = lr, None
    for t in range(1, 6):
        g = dict(zip(("w", "b"), train_grad(params["w"], params["b"])))
        if u_prev is not None:
            eta += beta * sum((g[k] * u_prev[k]).sum().item() for k in g)
        m = {k: 0.9 * m[k] + 0.1 * g[k] for k in g}
        v = {k: 0.999 * v[k] + 0.001 * g[k] ** 2 for k in g}
        u = {k: math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m[k] / (v[k].sqrt() + eps)
             for k in g}
        out, state = tx.update(g, state, params)
        if t == 1:
            assert hypergrad_lr_value(state) == lr  # u_0 = 0
        for k in out:  # both leaves moved with the same, global eta
            torch.testing.assert_close(out[k], -eta * u[k], rtol=1e-12, atol=0)
        params = {k: params[k] + out[k] for k in params}
        u_prev = u
    assert hypergrad_lr_value(state) != lr


# ---------------------------------------------------------------------------------------------
# Hyper-learning rate (§7.5.3, §11 item 28) and automatic mu (§7.5.4)

def _scripted_first_order(script, lr, beta, mu, alpha=0.0):
    """first_order sgd, no decay: Z^x_t = -g_{t-1}, so h_t = -<e_t, g_{t-1}>. The gradient is
    always the unit vector e_0 and the validation gradient p_t e_0: <e_t, b> = p_t, h = -p_t."""
    tx = hypergrad_lr("marthe", lr, beta, mu=mu, alpha=alpha, first_order=True)
    x = [torch.zeros(3, dtype=F64)]
    unit = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    state = tx.init(x)
    _, state = tx.update([unit.clone()], state, x)
    for p in script:
        _, state = tx.update([unit.clone()], state, x, val_grads=[p * unit])
        yield state


def test_alpha_zero_keeps_beta_while_eta_moves():
    states = list(_scripted_first_order([0.5, -0.2, 0.3], 0.1, 0.01, mu=0.0))
    assert all(float(s.hyper_lr) == 0.01 for s in states)
    assert float(states[-1].lr) == pytest.approx(0.1 + 0.01 * 0.6, rel=1e-14)


def test_beta_follows_adatunes_rule_and_is_clamped_at_zero():
    script = [-0.1, -0.1, 0.5, 0.3]  # h = -p: beta grows twice, then hits the clamp
    lr, beta, alpha = 0.1, 0.01, 0.5
    for p, state in zip(script, _scripted_first_order(script, lr, beta, 0.0, alpha)):
        h = -p
        lr = lr - beta * h
        beta = max(beta + alpha * h * lr, 0.0)
        assert float(state.lr) == pytest.approx(lr, rel=1e-14)
        assert float(state.hyper_lr) == pytest.approx(beta, rel=1e-14, abs=1e-300)
        assert float(state.hyper_lr) >= 0.0
    assert beta == 0.0 and float(state.lr) > 0.1  # the script drove it to the clamp


def _auto_mu_reference(script, lr, beta, mu0):
    mu, c, out = mu0, 0.0, []
    for p in script:
        lr += beta * p
        if p != 0.0:
            z = min(max(lr / p, 0.0), 1.0)
            c = c * (1.0 if mu > 0 else -1.0 if mu < 0 else 0.0) + mu
            mu = z ** (1.0 / (c + 1.0))
        out.append((lr, mu, c))
    return out


@pytest.mark.parametrize("mu0", ["auto", -0.5, -0.9])
def test_automatic_mu_reproduces_the_recurrence(mu0):
    script = [0.5, 0.2, 0.0, -0.01, 0.04, 0.03, 0.005, 0.06]
    lr, beta = 0.02, 0.001
    expected = _auto_mu_reference(script, lr, beta, 0.0 if mu0 == "auto" else mu0)
    states = list(_scripted_first_order(script, lr, beta, mu0))
    for t, (state, (eta, mu, c)) in enumerate(zip(states, expected)):
        assert float(state.lr) == pytest.approx(eta, rel=1e-14), t
        assert float(state.mu) == pytest.approx(mu, rel=1e-13, abs=1e-300), t
        assert float(state.mu_acc) == pytest.approx(c, rel=1e-13, abs=1e-300), t
    mus = [float(s.mu) for s in states]
    assert mus[2] == mus[1]        # <e, b> = 0: no update
    assert mus[3] == 0.0           # negative ratio: mu = 0, and c restarts
    assert 0.0 < mus[4] < 1.0 and mus[6] == 1.0


def test_auto_mu_first_update_exponent():
    # "auto" behaves as mu_0 -> 0-: mu = z; AdaTune's mu_0 = -0.5: mu = z^(1 / 0.5) = z^2
    for mu0, expected in (("auto", 0.25), (-0.5, 0.0625)):
        state = next(_scripted_first_order([0.1 / 0.25], 0.1, 0.0, mu0))
        assert float(state.mu) == pytest.approx(expected, rel=1e-14)


def test_auto_mu_asks_for_hvp_and_keeps_the_clipped_training_gradient():
    tx = marthe(0.1, mu="auto", grad_clip=0.5, dynamics="sgd")
    x = [torch.zeros(2, dtype=F64)]
    state = tx.init(x)
    assert not needs_hvp(tx, state)
    _, state = tx.update([torch.tensor([3.0, -0.25], dtype=F64)], state, x)
    assert needs_hvp(tx, state)
    assert torch.equal(state["hypergrad"].prev_grad[0], torch.tensor([0.5, -0.25], dtype=F64))


# ---------------------------------------------------------------------------------------------
# Clipping (§7.6 item 5)

def test_grad_clip_clips_the_hypergradient_inputs_and_not_the_step():
    g = torch.tensor([300.0, -2.0], dtype=F64)
    x = [torch.zeros(2, dtype=F64)]
    tx = hypergrad_lr("marthe", 0.1, 0.0, mu=0.0, grad_clip=100.0)
    out, state = tx.update([g.clone()], tx.init(x), x)
    assert torch.equal(out[0], -0.1 * g)
    assert torch.equal(state.tangent.x[0], -torch.tensor([100.0, -2.0], dtype=F64))
    tx = hypergrad_lr("marthe", 0.1, 0.0, mu=0.0, grad_clip=100.0, clip_training_grad=True)
    out, _ = tx.update([g.clone()], tx.init(x), x)
    assert torch.equal(out[0], -0.1 * torch.tensor([100.0, -2.0], dtype=F64))


def test_grad_clip_clamps_the_validation_gradient_and_the_hessian_product():
    tx = hypergrad_lr("marthe", 0.1, 1.0, mu=1.0, grad_clip=1.0)
    x = [torch.zeros(2, dtype=F64)]
    g = torch.tensor([0.5, -0.5], dtype=F64)
    _, state = tx.update([g.clone()], tx.init(x), x)                 # Z^x = -g
    _, state = tx.update([g.clone()], state, x, val_grads=[torch.tensor([10.0, 0.0], dtype=F64)],
                         hvp=lambda v: [1e3 * v[0]])
    assert float(state.lr) == pytest.approx(0.1 - 1.0 * (1.0 * -0.5), rel=1e-15)  # e -> 1
    # Z^x_3 = Z - eta clip(H Z) - g, clip(1e3 * -g) = (-1, 1)
    expected = -g - 0.6 * torch.tensor([-1.0, 1.0], dtype=F64) - g
    torch.testing.assert_close(state.tangent.x[0], expected, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# Safeguards

@pytest.mark.parametrize("min_lr", [None, 0.02])
@pytest.mark.parametrize("mode", ["hd", "marthe"])
def test_a_hyper_step_to_a_non_positive_lr_is_clamped_with_a_warning(mode, min_lr):
    # h = -<e, b> = -1 (marthe, first_order) or h = -<g, u_prev> = +1 (hd); beta = 1 makes
    # eta = 0.1 - 1 * 1 < 0 either way
    x = [torch.zeros(1, dtype=F64)]
    if mode == "hd":
        tx = chain(hypergrad_lr(mode, 0.1, 1.0, min_lr=min_lr))
        g1, g2, extras = torch.ones(1, dtype=F64), -torch.ones(1, dtype=F64), {}
    else:
        tx = hypergrad_lr(mode, 0.1, 1.0, first_order=True, min_lr=min_lr)
        g1, g2 = torch.ones(1, dtype=F64), torch.ones(1, dtype=F64)
        extras = {"val_grads": [-torch.ones(1, dtype=F64)]}
    _, state = tx.update([g1], tx.init(x), x)
    with pytest.warns(RuntimeWarning, match="clamped") as caught:
        out, state = tx.update([g2], state, x, **extras)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    floor = min_lr if min_lr is not None else LR_FLOOR_FACTOR * 0.1
    assert hypergrad_lr_value(state) == pytest.approx(floor, rel=1e-15)
    assert out[0].item() == pytest.approx(-floor * g2.item(), rel=1e-15)  # never ascent


def test_min_lr_floors_eta_without_warning_while_the_step_stays_positive():
    tx = hypergrad_lr("marthe", 0.1, 0.5, first_order=True, min_lr=0.09)
    x = [torch.zeros(1, dtype=F64)]
    _, state = tx.update([torch.ones(1, dtype=F64)], tx.init(x), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, state = tx.update([torch.ones(1, dtype=F64)], state, x,
                             val_grads=[-0.1 * torch.ones(1, dtype=F64)])  # eta -> 0.05
    assert float(state.lr) == 0.09


@pytest.mark.parametrize("mode", ["hd", "marthe"])
def test_a_non_finite_hypergradient_skips_the_hyper_step_with_a_warning(mode):
    x = [torch.zeros(2, dtype=F64)]
    tx = chain(hypergrad_lr(mode, 0.1, 0.01, alpha=0.5, **(
        {"first_order": True} if mode == "marthe" else {})))
    _, state = tx.update([torch.ones(2, dtype=F64)], tx.init(x), x)
    nan = torch.tensor([float("nan"), 1.0], dtype=F64)
    extras = {"val_grads": [nan]} if mode == "marthe" else {}
    with pytest.warns(RuntimeWarning, match="skipped"):
        out, state = tx.update([nan if mode == "hd" else torch.ones(2, dtype=F64)], state, x,
                               **extras)
    assert hypergrad_lr_value(state) == 0.1 and float(state[0].hyper_lr) == 0.01
    if mode == "marthe":  # the training step itself is fine
        assert torch.equal(out[0], torch.full((2,), -0.1, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Extras, validation, state


def test_missing_validation_gradient_after_the_first_call_names_the_fix():
    tx = hypergrad_lr("marthe", 0.1, 0.01, mu=0.0)
    x = [torch.zeros(2)]
    _, state = tx.update([torch.ones(2)], tx.init(x), x)
    with pytest.raises(ValueError, match="'val_grads'.*val_closure"):
        tx.update([torch.ones(2)], state, x)


def test_missing_hvp_names_the_fix_and_changes_nothing():
    tx = hypergrad_lr("marthe", 0.1, 0.01, mu=0.5)
    x = [torch.zeros(2)]
    _, state = tx.update([torch.ones(2)], tx.init(x), x)
    before = state.tangent.x[0].clone()
    with pytest.raises(ValueError, match="'hvp'.*create_graph"):
        tx.update([torch.ones(2)], state, x, val_grads=[torch.ones(2)])
    assert torch.equal(state.tangent.x[0], before) and state.count == 1


def test_hd_outside_a_chain_asks_for_the_raw_gradient():
    tx = hypergrad_lr("hd", 0.1, 0.01)
    x = [torch.zeros(2)]
    with pytest.raises(ValueError, match="'grads'.*chain"):
        tx.update([torch.ones(2)], tx.init(x), x)


def test_needs_hvp_by_mode():
    x = [torch.zeros(2)]
    cases = {"rtho": (rtho(0.1), True), "marthe": (marthe(0.1), True),
             "mu0": (marthe(0.1, mu=0.0), False), "first_order": (marthe(0.1, first_order=True),
                                                                  False)}
    for name, (tx, later) in cases.items():
        state = tx.init(x)
        assert not needs_hvp(tx, state), name
        _, state = tx.update([torch.ones(2)], state, x)
        assert needs_hvp(tx, state) == later, name
    assert hd_sgd(0.1).needs_hvp is None


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "md"}, "mode"),
    ({"init_lr": 0.0}, "init_lr"),
    ({"init_lr": -1.0}, "init_lr"),
    ({"hyper_lr": -1e-8}, "hyper_lr"),
    ({"alpha": -1.0}, "alpha"),
    ({"mu": 1.5}, "mu"),
    ({"mu": -1.0}, "mu"),
    ({"mu": "sometimes"}, "mu"),
    ({"dynamics": "rmsprop"}, "dynamics"),
    ({"dynamics": "sgd_momentum", "momentum": 1.0}, "momentum"),
    ({"dynamics": "sgd_momentum", "momentum": 0.0}, "momentum"),
    ({"dynamics": "sgd", "momentum": 0.5}, "momentum"),
    ({"dynamics": "sgd", "nesterov": True}, "nesterov"),
    ({"dynamics": "adam", "b1": 1.0}, "b1"),
    ({"dynamics": "adam", "eps": 0.0}, "eps"),
    ({"dynamics": "sgd", "b2": 0.9}, "b2"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"min_lr": 0.0}, "min_lr"),
    ({"min_lr": 1.0}, "min_lr"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"lr_in_jacobian": "first"}, "lr_in_jacobian"),
    ({"clip_training_grad": True}, "grad_clip"),
    ({"mode": "hd", "mu": 1.0}, "mu"),
    ({"mode": "hd", "dynamics": "adam"}, "dynamics"),
    ({"init_lr": lambda count: 0.1}, "init_lr"),
])
def test_invalid_arguments_raise_a_value_error_naming_them(kwargs, match):
    arguments = {"mode": "marthe", "init_lr": 0.1, "hyper_lr": 1e-8, **kwargs}
    with pytest.raises(ValueError, match=match):
        hypergrad_lr(**arguments)


def test_lr_in_jacobian_initial_uses_the_initial_lr_in_the_carried_term():
    # sgd, H = 2 I: Z_3 = Z_2 - eta_J 2 Z_2 - g with Z_2 = -g
    g = torch.ones(1, dtype=F64)
    x = [torch.zeros(1, dtype=F64)]
    tangents = {}
    for where in ("current", "initial"):
        tx = hypergrad_lr("marthe", 0.1, 0.02, mu=1.0, lr_in_jacobian=where)
        _, state = tx.update([g.clone()], tx.init(x), x)
        _, state = tx.update([g.clone()], state, x, val_grads=[-g], hvp=lambda v: [2 * v[0]])
        assert float(state.lr) == pytest.approx(0.08, rel=1e-15)  # h = <-1, -1> = 1
        tangents[where] = state.tangent.x[0].item()
    assert tangents["current"] == pytest.approx(-1 + 2 * 0.08 - 1, rel=1e-15)
    assert tangents["initial"] == pytest.approx(-1 + 2 * 0.1 - 1, rel=1e-15)


@pytest.mark.parametrize("dynamics", ["sgd", "sgd_momentum", "adam"])
def test_state_flattens_to_readable_keys_and_back(dynamics):
    tx = marthe(0.1, mu="auto", dynamics=dynamics)
    params = {"w": W0.clone(), "b": B0.clone()}
    state = tx.init(params)
    _, state = tx.update({"w": W0.clone(), "b": B0.clone()}, state, params)
    per_param, group = flatten_state(state, 2)
    assert {"hypergrad.lr", "hypergrad.hyper_lr", "hypergrad.mu", "hypergrad.mu_acc",
            "hypergrad.count"} <= set(group)
    blocks = {"sgd": {"x"}, "sgd_momentum": {"x", "momentum"}, "adam": {"x", "m", "v"}}
    assert {k for k in per_param[0] if k.startswith("hypergrad.tangent.")} == \
        {f"hypergrad.tangent.{b}" for b in blocks[dynamics]}
    assert "hypergrad.prev_grad" in per_param[0]
    restored = unflatten_state(tx.init(params), per_param, group)
    assert hypergrad_lr_value(restored) == 0.1
    assert torch.equal(restored["hypergrad"].tangent.x[0], state["hypergrad"].tangent.x[0])


def test_bfloat16_parameters_keep_float32_state_and_float64_scalars():
    tx = marthe(0.1, mu=0.0, dynamics="adam")
    x = [torch.ones(3, dtype=torch.bfloat16)]
    state = tx.init(x)
    out, state = tx.update([torch.ones(3, dtype=torch.bfloat16)], state, x)
    inner = state["hypergrad"]
    assert out[0].dtype == torch.float32 and inner.tangent.x[0].dtype == torch.float32
    assert inner.dynamics.m[0].dtype == torch.float32 and inner.lr.dtype == F64
