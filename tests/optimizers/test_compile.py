"""``compile=True`` on every named optimizer: the compiled steps follow the eager trajectory,
and once every code path of a recipe has compiled, a learning rate that changes at every step
(an LR scheduler) triggers no recompilation. Under a user's ``torch.compile`` (of
``optimizer.step``, or of a whole training step) every optimizer runs its step as it is."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from recipes import ALL, VALIDATED, make, step
from torch._dynamo.utils import counters

from gradchain.optimizers import AdamW

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

#: its base is torch.optim.SGD, which has no compile option (torch.compile(opt.step) is torch's)
COMPILABLE = [name for name in ALL if name != "mechanize:sgd"]
#: steps until every path has compiled: the first step, the second (the step counters become
#: symbolic), SOAP's initialisation-only first call and first refresh, the first hyper-steps,
#: and ESGD's first steps with and without a Hessian-vector product (every 2 steps here)
WARMUP = 5
STEPS = 8


def problem(dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(6, dtype=dtype))
    x = torch.randn(16, 4, generator=gen, dtype=dtype)
    return [w, b], lambda: torch.tanh(x @ w.T + b).square().mean()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def run(name: str, compile: bool, dtype: torch.dtype = torch.float32
        ) -> tuple[torch.Tensor, list[int]]:
    """Parameters after STEPS steps under a StepLR that changes the lr at every step, and the
    number of compiled graphs after each step."""
    torch._dynamo.reset()
    counters.clear()
    params, loss_fn = problem(dtype)
    optimizer = make(name, params, compile=compile)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
    seen = []
    for _ in range(STEPS):
        step(name, optimizer, loss_fn)
        scheduler.step()
        seen.append(graphs())
    return torch.cat([p.detach().reshape(-1) for p in params]), seen


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILABLE)
def test_compiled_steps_follow_eager_and_do_not_recompile_as_the_lr_changes(name):
    """In float64: compiled and eager kernels round differently (fused or not), and SOAP's
    eigenbases turn float32 last-bit differences into 1e-4 ones within 8 steps."""
    eager, _ = run(name, compile=False, dtype=torch.float64)
    compiled, seen = run(name, compile=True, dtype=torch.float64)
    assert seen[0] > 0, "nothing was compiled"
    assert seen[WARMUP - 1:] == [seen[WARMUP - 1]] * (STEPS - WARMUP + 1), \
        f"{name} recompiled as the learning rate changed: graphs after each step {seen}"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_a_scheduled_adamw_compiles_twice_and_matches_eager():
    """The fast version of the test above, run without the slow marker: the lr is a tensor in
    the graph, so StepLR's changes cost nothing; only the step counter's first change does."""
    eager, _ = run("adamw", compile=False)
    compiled, seen = run("adamw", compile=True)
    assert seen == [1] + [2] * (STEPS - 1), seen
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_changing_another_hyperparameter_rebuilds_the_chain():
    params, loss_fn = problem()
    optimizer = AdamW(params, lr=1e-2, compile=True)
    step("adamw", optimizer, loss_fn)
    first = optimizer._transform(0)
    optimizer.param_groups[0]["lr"] = 3e-3
    assert optimizer._transform(0)[1] is first[1]
    optimizer.param_groups[0]["weight_decay"] = 0.5
    assert optimizer._transform(0)[1] is not first[1]


def test_a_negative_compiled_learning_rate_is_refused():
    params, loss_fn = problem()
    optimizer = AdamW(params, lr=1e-2, compile=True)
    step("adamw", optimizer, loss_fn)
    optimizer.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        step("adamw", optimizer, loss_fn)


@pytest.mark.parametrize("name", ALL)
def test_torch_compile_of_the_step_runs_it_as_it_is(name):
    # torch's way of compiling an optimizer, torch.compile(optimizer.step): ours leave the
    # frame to eager mode (their own graph is compile=True), with the same numbers
    torch._dynamo.reset()
    results = []
    for wrap in (torch.compile, lambda f: f):
        params, loss = problem()
        optimizer = make(name, params)
        optimizer_step = wrap(optimizer.step)

        def closure():
            optimizer.zero_grad()
            value = loss()
            value.backward()
            return value

        for _ in range(3):
            optimizer_step(closure, **({"val_closure": loss} if name in VALIDATED else {}))
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("compile", [False, True])
def test_a_compiled_training_step_with_the_optimizer_inside(compile):
    torch._dynamo.reset()
    results = []
    for wrap in (torch.compile, lambda f: f):
        params, loss = problem()
        optimizer = AdamW(params, lr=0.1, compile=compile)

        def train_step():
            value = loss()
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
            return value

        train_step = wrap(train_step)
        for _ in range(3):
            train_step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_scheduler_that_cycles_momentum_is_warned_about_once_and_the_lr_alone_is_not():
    torch._dynamo.reset()
    for cycle_momentum in (True, False):
        params, loss = problem()
        optimizer = AdamW(params, lr=0.1, compile=True)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20,
                                                        cycle_momentum=cycle_momentum)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):  # the second change of betas is at the third step
                optimizer.zero_grad()
                loss().backward()
                optimizer.step()
                scheduler.step()
        messages = [str(w.message) for w in caught if "compiles the step anew" in str(w.message)]
        assert len(messages) == (1 if cycle_momentum else 0)
        assert all("['betas']" in m and "cycle_momentum" in m for m in messages)
        assert all(w.filename == __file__ for w in caught if "compiles the step" in str(w.message))


def test_one_change_of_every_group_s_hyperparameters_is_not_warned_about():
    torch._dynamo.reset()
    params, loss = problem()
    optimizer = AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for count in range(3):
            if count == 1:
                for group in optimizer.param_groups:
                    group["weight_decay"] = 0.5
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
    assert not [w for w in caught if "compiles the step anew" in str(w.message)]


def test_groups_with_different_betas_compile_without_graph_breaks():
    # the second group's decays are symbolic floats to dynamo (they differ from the first's):
    # the bias corrections must not look up attributes on them
    def run_groups(compile: bool) -> list[torch.Tensor]:
        params, loss = problem()
        groups = [{"params": [p], "betas": (0.9 - 0.1 * i, 0.99)} for i, p in enumerate(params)]
        optimizer = AdamW(groups, lr=0.1, compile=compile)
        for _ in range(3):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
        return [p.detach() for p in params]

    torch._dynamo.reset()
    counters.clear()
    compiled = run_groups(compile=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(compiled, run_groups(compile=False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_each_optimizer_compiles_its_own_steps_past_dynamo_s_recompile_limit():
    # dynamo counts compiled graphs per code object, up to recompile_limit (8): every optimizer
    # runs its own copy of the step's code, so a notebook's tenth compiled optimizer still compiles
    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    for index in range(limit + 2):
        params, loss = problem()
        optimizer = AdamW(params, lr=0.1, betas=(0.5 + 0.01 * index, 0.99), compile=True)
        before = graphs()
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        assert graphs() > before, f"optimizer {index} ran its step eagerly"
