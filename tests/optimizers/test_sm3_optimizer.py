"""The SM3 optimizer, recipe and schedule (ALGORITHMS.md §1, §8.2, §10 rows 1-6).

The reference is the published torch-SM3 package (``pip install torch-SM3``, imported as
``SM3``): step-by-step parity where it follows the spec, and a demonstration of the difference
where it does not (sparse rows reset, running-max EMA).
"""

from __future__ import annotations

import inspect
import io
import math

import pytest
import torch
from torch import nn

from gradchain.chains.combinators import named_chain
from gradchain.chains.sm3 import sm3
from gradchain.optimizers.adapter import ChainOptimizer
from gradchain.optimizers.sm3 import SM3
from gradchain.schedules import sm3_warmup_cooldown
from gradchain.transforms.basic import scale_by_learning_rate
from gradchain.transforms.sm3 import scale_by_sm3

F64 = torch.float64
SHAPES = {"matrix": (6, 5), "tensor": (3, 4, 2), "vector": (7,), "scalar": ()}


@pytest.fixture(scope="module")
def reference():
    return pytest.importorskip("SM3").SM3


def _parameters(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in SHAPES.values()]


def _gradients(steps: int, seed: int = 1, decaying: bool = False) -> list[list[torch.Tensor]]:
    """Random gradients with magnitudes over ~3 decades and ~15% exact zeros; ``decaying``:
    each step 0.7 times smaller, so moving averages and running maxima part ways."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        step = []
        for s in SHAPES.values():
            g = torch.randn(s, generator=gen, dtype=F64)
            g = g * torch.exp(1.5 * torch.randn(s, generator=gen, dtype=F64))
            g = torch.where(torch.rand(s, generator=gen, dtype=F64) < 0.15, 0.0, g)
            step.append(g * 0.7 ** t if decaying else g)
        out.append(step)
    return out


def _trajectory(make_optimizer, grads, scheduler=None) -> list[list[torch.Tensor]]:
    params = _parameters()
    optimizer = make_optimizer(params)
    lr_scheduler = scheduler(optimizer) if scheduler else None
    points = []
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        points.append([p.detach().clone() for p in params])
    return points


def _max_relative_error(ours, theirs) -> float:
    worst = 0.0
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            worst = max(worst, ((x - y).norm() / y.norm()).item())
    return worst


# ---------------------------------------------------------------------------------------------
# Parity with torch-SM3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_torch_sm3_step_by_step(momentum, reference):
    grads = _gradients(25)
    ours = _trajectory(lambda p: SM3(p, lr=0.05, momentum=momentum), grads)
    theirs = _trajectory(lambda p: reference(p, lr=0.05, momentum=momentum), grads)
    assert _max_relative_error(ours, theirs) < 1e-13


def test_matches_torch_sm3_under_the_seed_warmup_lambda(reference):
    # the seed's advice, lr_lambda = min(1, (epoch / W)^2), through torch's LambdaLR
    grads = _gradients(20)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda epoch: min(1.0, (epoch / 5) ** 2))
    ours = _trajectory(lambda p: SM3(p, lr=0.1), grads, schedule)
    theirs = _trajectory(lambda p: reference(p, lr=0.1), grads, schedule)
    assert _max_relative_error(ours, theirs) < 1e-13
    assert all(torch.equal(x, y) for x, y in zip(ours[0], _parameters()))  # factor 0 at step 0


def _running_max_sm3(params, momentum: float, beta: float, lr: float):
    return ChainOptimizer(params, named_chain(
        ("sm3", scale_by_sm3(b1=momentum, b2=beta, ema_accumulator_rule="running_max")),
        ("lr", scale_by_learning_rate(lr))))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_running_max_rule_matches_torch_sm3_with_beta(momentum, reference):
    grads = _gradients(25, decaying=True)
    ours = _trajectory(lambda p: _running_max_sm3(p, momentum, 0.9, 0.05), grads)
    theirs = _trajectory(lambda p: reference(p, lr=0.05, momentum=momentum, beta=0.9), grads)
    assert _max_relative_error(ours, theirs) < 1e-13


def test_default_ema_rule_decays_where_torch_sm3_keeps_a_running_max(reference):
    # §10 row 2: SM3(beta=0.9) follows the authors (assign), torch-SM3 never lets mu decrease
    grads = _gradients(25, decaying=True)
    ours = _trajectory(lambda p: SM3(p, lr=0.05, beta=0.9), grads)
    theirs = _trajectory(lambda p: reference(p, lr=0.05, beta=0.9), grads)
    assert _max_relative_error(ours, theirs) > 1e-3
    params = _parameters()
    optimizer = SM3(params, lr=0.05, beta=0.9)
    peaks = None
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
        mu = optimizer.state[params[0]]["sm3.mu.0"]
        peaks = mu.clone() if peaks is None else torch.maximum(peaks, mu)
    assert (mu < 0.5 * peaks).all()  # decayed well below their maxima


def test_sparse_rows_keep_their_history_where_torch_sm3_resets_them(reference):
    # §10 row 1 on a rank-1 leaf (torch-SM3 crashes on rank >= 2, see below)
    steps = [([0, 1, 2], [1.0, 2.0, 3.0]), ([0], [1.0]), ([1], [2.0])]

    def run(make):
        p = nn.Parameter(torch.zeros(4, dtype=F64))
        optimizer = make([p])
        for index, values in steps:
            p.grad = torch.sparse_coo_tensor(torch.tensor([index]), torch.tensor(values,
                                             dtype=F64), (4,), check_invariants=True).coalesce()
            optimizer.step()
        return p.detach()

    ours, theirs = run(lambda p: SM3(p, lr=1.0)), run(lambda p: reference(p, lr=1.0))
    # per-entry Adagrad over the steps where the entry is present (the TF original)
    expected = torch.tensor([-1 - 1 / math.sqrt(2), -1 - 2 / math.sqrt(8), -1.0, 0.0], dtype=F64)
    torch.testing.assert_close(ours, expected, rtol=1e-15, atol=0)
    assert theirs[1].item() == -2.0  # entry 1 forgot its history: its second step was -1 again
    assert ours[1].item() != theirs[1].item()


def test_row_sparse_matrix_gradients_work_where_torch_sm3_crashes(reference):
    shape = (4, 2)
    grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([[3.0, -4.0], [1.0, 0.0]],
                                   dtype=F64), shape, check_invariants=True)
    theirs = nn.Parameter(torch.zeros(shape, dtype=F64))
    theirs.grad = grad.clone()
    with pytest.raises(RuntimeError):
        reference([theirs], lr=1.0).step()
    ours = nn.Parameter(torch.zeros(shape, dtype=F64))
    ours.grad = grad.clone()
    SM3([ours], lr=1.0).step()
    expected = torch.zeros(shape, dtype=F64)
    expected[1] = torch.tensor([-1.0, 1.0])
    expected[3] = torch.tensor([-1.0, 0.0])
    assert torch.equal(ours.detach(), expected)


def test_signature_and_defaults_are_torch_sm3s(reference):
    ours = inspect.signature(SM3).parameters
    theirs = inspect.signature(reference).parameters
    assert [n for n in ours if n != "options"] == list(theirs)
    assert all(ours[n].default == theirs[n].default for n in theirs)


# ---------------------------------------------------------------------------------------------
# Sparse embeddings through the optimizer


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_embedding_trains_and_leaves_unseen_rows_alone(momentum):
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 8, sparse=True)
    head = nn.Linear(8, 1)
    initial = embedding.weight.detach().clone()
    optimizer = SM3([*embedding.parameters(), *head.parameters()], lr=0.05, momentum=momentum)
    targets = torch.randn(50)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        tokens = torch.randint(0, 30, (16,), generator=data)  # rows 30..49 are never seen
        loss = (head(embedding(tokens)).squeeze(-1) - targets[tokens]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert embedding.weight.grad.is_sparse
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert torch.equal(embedding.weight[30:], initial[30:])
    assert not torch.equal(embedding.weight[:30], initial[:30])
    state = optimizer.state[embedding.weight]
    rows = state["sm3.mu.0"].flatten()
    assert (rows[:30] > 0).all() and (rows[30:] == 0).all()
    assert (state["sm3.mu.1"] == 0).all()  # the column cover is dense-only
    if momentum:
        assert (state["sm3.momentum"] == 0).all()  # momentum is ignored for sparse leaves
        assert (optimizer.state[head.weight]["sm3.momentum"] != 0).any()


# ---------------------------------------------------------------------------------------------
# State: memory, keys, checkpoints


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("shape, accumulators", [((40, 30), 70), ((5, 6, 7), 18), ((9,), 9),
                                                 ((), 1), ((12, 1), 13)])
def test_state_size_is_the_sum_of_the_axes(shape, accumulators, momentum):
    p = nn.Parameter(torch.zeros(shape))
    optimizer = SM3([p], momentum=momentum)
    p.grad = torch.ones(shape)
    optimizer.step()
    entry = optimizer.state_dict()["state"][0]
    numel = sum(v.numel() for v in entry.values() if isinstance(v, torch.Tensor))
    assert numel == accumulators + (p.numel() if momentum else 0)
    assert {k for k, v in entry.items() if isinstance(v, torch.Tensor)} == \
        {f"sm3.mu.{a}" for a in range(max(1, len(shape)))} | ({"sm3.momentum"} if momentum
                                                              else set())


def test_state_of_a_gpt_sized_model_is_far_below_one_percent_of_adamw():
    d, vocab, layers = 512, 8192, 6
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
             (d, 4 * d), (d,)]
    shapes = [(vocab, d)] + block * layers + [(d,), (d,), (vocab, d)]
    params = [torch.empty(s, device="meta") for s in shapes]
    state = scale_by_sm3().init(params)
    sm3_numel = sum(a.numel() for mu in state.mu for a in mu)
    adamw_numel = 2 * sum(p.numel() for p in params)
    assert sm3_numel / adamw_numel < 0.01
    assert sm3_numel == sum(sum(s) for s in shapes)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_an_eager_step_allocates_no_tensor_of_the_parameters_size(monkeypatch, momentum):
    # the update is added to the parameter block by block from one scratch block: the largest
    # allocation is a block of rows, not the 64 KiB parameter (nor its output, as a chain's
    # update followed by an addition would allocate)
    from torch.profiler import profile

    from gradchain.transforms import sm3 as sm3_module
    monkeypatch.setattr(sm3_module, "BLOCK_ELEMENTS", 1024)
    p = nn.Parameter(torch.randn(128, 128))
    p.grad = torch.randn_like(p)
    optimizer = SM3([p], lr=0.1, momentum=momentum)
    optimizer.step()
    with profile(profile_memory=True) as profiler:
        optimizer.step()
    largest = max(event.cpu_memory_usage for event in profiler.events())
    assert 1024 * 4 <= largest < p.numel() * 4 // 4


def test_save_load_continue_is_bit_identical():
    grads = _gradients(12)

    def make(params):
        return SM3(params, lr=0.05, momentum=0.9, beta=0.8)

    straight = _trajectory(make, grads)[-1]
    params = _parameters()
    optimizer = make(params)
    for step in grads[:6]:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(params)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in grads[6:]:
        for p, g in zip(params, step):
            p.grad = g.clone()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(params, straight))


def test_bfloat16_parameters_keep_float32_accumulators():
    p = nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    optimizer = SM3([p], lr=0.01, momentum=0.5)
    for _ in range(3):
        p.grad = torch.randn(8, 4, dtype=torch.bfloat16)
        optimizer.step()
    entry = optimizer.state[p]
    assert all(entry[k].dtype == torch.float32 for k in ("sm3.mu.0", "sm3.mu.1", "sm3.momentum"))
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()


@pytest.mark.slow
def test_compiled_step_matches_eager():
    grads = _gradients(4)
    eager = _trajectory(lambda p: SM3(p, lr=0.05, momentum=0.9), grads)
    compiled = _trajectory(lambda p: SM3(p, lr=0.05, momentum=0.9, compile=True), grads)
    assert _max_relative_error(compiled, eager) < 1e-12


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kwargs, name", [(dict(lr=-0.1), "lr"), (dict(momentum=1.0), "momentum"),
                                          (dict(momentum=-0.5), "momentum"),
                                          (dict(beta=1.0), "beta"), (dict(beta=-0.1), "beta"),
                                          (dict(eps=-1.0), "eps")])
def test_invalid_hyperparameters_raise_at_construction_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SM3([nn.Parameter(torch.zeros(2))], **kwargs)


# ---------------------------------------------------------------------------------------------
# The recipe and its schedule (§8.2)


def test_recipe_members_and_constant_learning_rate():
    params = {"w": torch.zeros(3, 2, dtype=F64)}
    tx = sm3(0.5)
    state = tx.init(params)
    assert list(state) == ["sm3", "lr"]
    out, state = tx.update({"w": torch.full((3, 2), 4.0, dtype=F64)}, state, params)
    assert torch.equal(out["w"], torch.full((3, 2), -0.5, dtype=F64))


def test_recipe_schedule_equals_the_seed_lambda_through_lambdalr():
    # ChainOptimizer(chains.sm3, warmup_steps, total_steps) = SM3 + LambdaLR(seed's lambda) up
    # to T; beyond T the seed's lambda turns negative, the recipe's schedule stays at 0
    warmup, total = 4, 30
    grads = _gradients(total + 2)
    seed_lambda = lambda e: min(1.0, (e / warmup) ** 2, (total - e) / (0.1 * total))  # noqa
    ours = _trajectory(lambda p: ChainOptimizer(p, sm3, lr=0.2, warmup_steps=warmup,
                                                total_steps=total), grads)
    theirs = _trajectory(lambda p: SM3(p, lr=0.2), grads[:total],
                         lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, seed_lambda))
    assert _max_relative_error(ours[:total], theirs) < 1e-14
    assert all(torch.equal(x, y) for x, y in zip(ours[0], _parameters()))  # f(0) = 0
    for later in ours[total:]:  # f(T) = f(T + 1) = 0
        assert all(torch.equal(x, y) for x, y in zip(later, ours[total - 1]))


def test_recipe_accepts_a_learning_rate_schedule_with_the_warmup():
    tx = sm3(lambda count: 2.0 ** -count, warmup_steps=2, total_steps=None)
    params = [torch.zeros(2, dtype=F64)]
    state = tx.init(params)
    outs = []
    for _ in range(4):
        out, state = tx.update([torch.ones(2, dtype=F64)], state, params)
        outs.append(out[0][0].item())
    # lr(c) = 2^-c * min(1, (c/2)^2); the SM3 direction is 1 / sqrt(t)
    expected = [0.0, -0.5 * 0.25 / math.sqrt(2), -0.25 / math.sqrt(3), -0.125 / 2]
    assert outs == pytest.approx(expected, rel=1e-15, abs=0)


def test_schedule_warmup_is_quadratic_and_cooldown_linear():
    f = sm3_warmup_cooldown(0.8, warmup_steps=10, total_steps=200, cooldown_fraction=0.1)
    assert f(0) == 0.0
    for c in range(11):
        assert f(c) == pytest.approx(0.8 * (c / 10) ** 2, rel=1e-15)
    assert all(f(c) == 0.8 for c in range(10, 181))
    for c in range(180, 201):
        assert f(c) == pytest.approx(0.8 * (200 - c) / 20, rel=1e-15, abs=1e-16)
    assert f(200) == 0.0 and f(201) == 0.0 and f(10_000) == 0.0  # guarded beyond T


def test_schedule_power_and_optional_parts():
    linear = sm3_warmup_cooldown(1.0, 4, 100, power=1.0)
    assert [linear(c) for c in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    no_cooldown = sm3_warmup_cooldown(1.0, 2, None)
    assert [no_cooldown(c) for c in (0, 1, 2, 10 ** 9)] == [0.0, 0.25, 1.0, 1.0]
    no_warmup = sm3_warmup_cooldown(2.0, 0, 10, cooldown_fraction=0.5)
    assert [no_warmup(c) for c in (0, 5, 6, 10, 11)] == [2.0, 2.0, 1.6, 0.0, 0.0]
    assert isinstance(no_warmup(3), float)


@pytest.mark.parametrize("kwargs, name", [
    (dict(peak_value=float("nan")), "peak_value"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"), (dict(total_steps=0), "total_steps"),
    (dict(power=0.0), "power"), (dict(cooldown_fraction=0.0), "cooldown_fraction"),
    (dict(cooldown_fraction=1.5), "cooldown_fraction"),
    (dict(warmup_steps=20, total_steps=10), "warmup_steps"),
])
def test_schedule_validation(kwargs, name):
    arguments = dict(peak_value=0.1, warmup_steps=5, total_steps=100, **{})
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=name):
        sm3_warmup_cooldown(**arguments)
