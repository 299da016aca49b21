"""The adapter's options on every named optimizer (and two mechanized ones): ``foreach`` picks
how a step walks the parameters without changing a bit of the result, and ``skip_nonfinite``
leaves parameters and state untouched on a step with a NaN or infinite gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
from recipes import ALL, make, step

import gradchain.optimizers.adapter as adapter
from gradchain.optimizers import SGD, AdamW

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPES = [(12, 5), (7,), (40, 3), (3, 2, 4), ()]
#: mechanize(torch.optim.SGD): its base is torch's class, which has no skip_nonfinite
OURS = [name for name in ALL if name != "mechanize:sgd"]


def problem():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]
    x = torch.randn(9, 5, generator=gen)
    w, v, u, t, s = params

    def loss_fn():
        h = torch.tanh(x @ w.T)
        return ((h.sum(1, keepdim=True) * u[:9]).square().mean() + v.square().sum() * s
                + t.sin().sum())

    return params, loss_fn


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def train(name: str, steps: int = 5, **options) -> torch.Tensor:
    params, loss_fn = problem()
    optimizer = make(name, params, **options)
    for _ in range(steps):
        step(name, optimizer, loss_fn)
    return flat(params)


@pytest.mark.parametrize("name", ALL)
def test_foreach_modes_give_bitwise_equal_trajectories(name, monkeypatch):
    # small pieces, so that the default mode splits the group and the large parameter (40 x 3)
    # into blocks of rows, as it does with real models
    monkeypatch.setattr(adapter, "CHUNK_ELEMENTS", 16)
    pieces = train(name)
    whole = train(name, foreach=True)
    one_at_a_time = train(name, foreach=False)
    assert torch.equal(pieces, whole), f"{name}: default vs foreach=True"
    assert torch.equal(pieces, one_at_a_time), f"{name}: default vs foreach=False"


def test_the_default_mode_does_split_the_group(monkeypatch):
    monkeypatch.setattr(adapter, "CHUNK_ELEMENTS", 16)
    params, _ = problem()
    tx = AdamW(params)._transform(0)[0]
    active = list(range(len(params)))
    assert len(adapter._pieces(params, active, tx)) > len(params)
    assert adapter._pieces(params, active, tx, foreach=True) == [(active, None)]
    assert adapter._pieces(params, active, tx, foreach=False) == [([i], None) for i in active]


@pytest.mark.parametrize("make, tensors", [
    (lambda p: SGD(p, lr=0.1), 2),                  # parameter and gradient
    (lambda p: SGD(p, lr=0.1, momentum=0.9), 3),    # and the momentum buffer
    (lambda p: AdamW(p), 4),                        # and both moments
])
def test_pieces_share_the_cache_among_the_parameter_sized_tensors(make, tensors):
    params = [torch.nn.Parameter(torch.zeros(64, 32)), torch.nn.Parameter(torch.zeros(5))]
    optimizer = make(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = optimizer._group_states[0]
    assert adapter._piece_elements(params, [0, 1], state) == adapter.CHUNK_ELEMENTS // tensors


def test_foreach_must_be_none_or_a_bool():
    with pytest.raises(ValueError, match="foreach must be None, True or False"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], foreach="yes")


def poisoned(loss_fn, params, value: float):
    """``loss_fn`` plus a term whose gradient adds ``value`` to the first parameter's."""
    return lambda: loss_fn() + (params[0] * value).sum()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", OURS)
def test_skip_nonfinite_leaves_everything_as_it_was_and_training_goes_on(name, bad):
    params, loss_fn = problem()
    optimizer = make(name, params, skip_nonfinite=True)
    for _ in range(2):
        step(name, optimizer, loss_fn)
    before, state_before = flat(params), optimizer.state_dict()
    with pytest.warns(RuntimeWarning, match="optimizer step skipped") as caught:
        step(name, optimizer, poisoned(loss_fn, params, bad), val_loss_fn=loss_fn)
    # the warning points at the line that called step() (recipes.step), not into the library
    assert any(w.filename.endswith("recipes.py") for w in caught)
    assert not all(torch.isfinite(p.grad).all() for p in params)
    assert torch.equal(flat(params), before)
    assert_same_state(optimizer.state_dict(), state_before)
    assert optimizer.skipped_steps == 1
    for _ in range(2):
        step(name, optimizer, loss_fn)
    assert torch.equal(flat(params), train(name, steps=4, skip_nonfinite=True)), \
        "the skipped step changed the trajectory"


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for field, value in a["state"][key].items():
            other = b["state"][key][field]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), field
            else:
                assert value == other, field


def test_skipped_steps_are_saved_and_restored():
    params, loss_fn = problem()
    optimizer = AdamW(params, skip_nonfinite=True)
    with pytest.warns(RuntimeWarning):
        step("adamw", optimizer, poisoned(loss_fn, params, float("nan")))
    fresh = AdamW(problem()[0], skip_nonfinite=True)
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.skipped_steps == 1


def test_without_protection_a_nan_gradient_reaches_the_parameters_as_in_torch():
    params, loss_fn = problem()
    ours = AdamW(params)
    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(theirs_params)
    for optimizer, ps in ((ours, params), (theirs, theirs_params)):
        optimizer.zero_grad()
        for p in ps:
            p.grad = torch.ones_like(p)
        ps[0].grad[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no skip, no warning
            optimizer.step()
    assert torch.isnan(params[0][0, 0]) and torch.isnan(theirs_params[0][0, 0])
    assert torch.isfinite(params[1]).all()
    assert ours.skipped_steps == 0
