"""The HeavyBall family (ALGORITHMS.md §8.5, §10, §11 items 16, 29): closed forms through the
optimizer classes, parity with the published ``heavyball`` package (0.8.1, the importable
release of 0.8.0) where its behaviour is not a listed defect, and the optimizer contract."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradchain
from gradchain import chains
from gradchain.optimizers import heavyball as hb_optimizers

NAMES = {  # ours -> HeavyBall's
    "AdamWInplace": "ForeachAdamW",
    "LaProp": "ForeachLaProp",
    "ADOPT": "ForeachADOPT",
    "SFAdamW": "ForeachSFAdamW",
    "PaLMSFAdamW": "PaLMForeachSFAdamW",
    "SOAP": "ForeachSOAP",
    "PaLMSOAP": "PaLMForeachSOAP",
    "SFPaLMSOAP": "SFPaLMForeachSOAP",
    "PrecondScheduleSFPaLMSOAP": "PrecondScheduleSFPaLMForeachSOAP",
    "PrecondSchedulePaLMSOAP": "PrecondSchedulePaLMForeachSOAP",
    "PrecondScheduleSOAP": "PrecondScheduleForeachSOAP",
}
SCHEDULE_FREE = {"SFAdamW", "PaLMSFAdamW", "SFPaLMSOAP", "PrecondScheduleSFPaLMSOAP"}
INIT_CALL = {name for name in NAMES if "SOAP" in name} | {"ADOPT"}


def _cls(name: str) -> type:
    return getattr(hb_optimizers, name)


def _steps(opt, params, grads):
    """Apply a scripted gradient sequence; return the parameters after every step."""
    trajectory = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


# ----------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_answers_to_heavyballs_name_and_is_a_recipe(name):
    assert getattr(hb_optimizers, NAMES[name]) is _cls(name)
    assert getattr(gradchain.optimizers, name) is _cls(name)
    assert getattr(gradchain.optimizers, NAMES[name]) is _cls(name)
    assert issubclass(_cls(name), torch.optim.Optimizer)


def test_recipes_are_in_chains():
    for recipe in ("adamw_inplace", "laprop", "adopt", "sfadamw", "palm_sfadamw", "soap",
                   "palm_soap", "sf_palm_soap", "precond_schedule_sf_palm_soap",
                   "precond_schedule_palm_soap", "precond_schedule_soap"):
        assert isinstance(getattr(chains, recipe)(), gradchain.GradientTransformation)


# ----------------------------------------------------------------------------------------------
# Closed forms (§11 items 16, 29)


@pytest.mark.parametrize("name, expected", [
    ("LaProp", [0.9, 0.8, 0.7]),
    ("SFAdamW", [0.9, 0.845, 0.79]),
    ("ADOPT", [1.0, 0.9, 0.8]),
    ("AdamWInplace", [0.9, 0.8, 0.7]),
])
def test_three_steps_on_a_constant_gradient(name, expected):
    x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = _cls(name)([x], lr=0.1, warmup_steps=1)
    got = [t[0].item() for t in _steps(opt, [x], [[torch.ones(1, dtype=torch.float64)]] * 3)]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["SOAP", "PaLMSOAP", "PrecondSchedulePaLMSOAP",
                                  "PrecondScheduleSOAP"])
def test_soap_first_call_is_still_and_first_update_has_norm_lr_sqrt_numel(name):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    opt = _cls(name)([w, b], lr=0.1, weight_decay=0.5)
    w0, b0 = w.detach().clone(), b.detach().clone()
    grads = [[torch.randn(4, 3, generator=gen, dtype=torch.float64),
              torch.randn(5, generator=gen, dtype=torch.float64)] for _ in range(2)]
    (w1, b1), _ = _steps(opt, [w, b], grads[:1])[0], None
    assert torch.equal(w1, w0) and torch.equal(b1, b0)  # nothing moves, weight decay included
    opt.param_groups[0]["weight_decay"] = 0.0
    w2, b2 = _steps(opt, [w, b], grads[1:])[0]
    assert (w2 - w0).norm().item() == pytest.approx(0.1 * math.sqrt(12), rel=1e-9)
    torch.testing.assert_close((b2 - b0).abs(), torch.full((5,), 0.1, dtype=torch.float64))


def test_weight_decay_shrinks_the_weights():
    """HeavyBall 0.8 multiplied them by 1 + lr * wd (§10 row 17)."""
    x = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = _cls("AdamWInplace")([x], lr=0.1, weight_decay=0.5)
    x.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(x.detach(), torch.full((3,), 2.0 * (1 - 0.05)))


@pytest.mark.parametrize("name", ["SFPaLMSOAP", "PrecondScheduleSFPaLMSOAP"])
def test_schedule_free_soap_applies_weight_decay(name):
    """HeavyBall 0.8 dropped it (§10 row 18)."""
    def final(weight_decay):
        x = torch.nn.Parameter(torch.ones(3, 3))
        opt = _cls(name)([x], lr=0.1, weight_decay=weight_decay)
        for _ in range(4):
            x.grad = torch.eye(3) * 1e-3
            opt.step()
        return x.detach()

    assert final(0.5).norm() < final(0.0).norm()


# ----------------------------------------------------------------------------------------------
# Optimizer contract, every class


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).to(dtype)


def _train(opt, model, steps=30, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 6, generator=gen).to(dtype)
    targets = inputs[:, :1].sin().to(dtype)
    losses = []
    for _ in range(steps):
        loss = (model(inputs).float() - targets.float()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_every_class_trains_a_small_model(name):
    model = _model()
    opt = _cls(name)(model.parameters(), lr=1e-2)
    losses = _train(opt, model)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_parameters_train_with_float32_state(name):
    model = _model(torch.bfloat16)
    opt = _cls(name)(model.parameters(), lr=1e-2)
    losses = _train(opt, model, dtype=torch.bfloat16)
    assert losses[-1] < 0.8 * losses[0]
    floats = [v for entry in opt.state_dict()["state"].values() for v in entry.values()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1]
    assert floats and all(v.dtype == torch.float32 for v in floats)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bit_identically(name):
    def run(interrupt: bool):
        model = _model()
        opt = _cls(name)(model.parameters(), lr=1e-2, warmup_steps=2)
        _train(opt, model, steps=5)
        if interrupt:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model = _model()
            model.load_state_dict(saved["model"])
            opt = _cls(name)(model.parameters(), lr=1e-2, warmup_steps=2)
            opt.load_state_dict(saved["opt"])
        _train(opt, model, steps=5)
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE))
def test_schedule_free_eval_and_train_swap_the_average_in_and_out(name):
    model = _model()
    opt = _cls(name)(model.parameters(), lr=1e-2)
    _train(opt, model, steps=5)
    y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    x = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(x, y))
    opt.eval()  # idempotent
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), x))
    with pytest.raises(RuntimeError, match="train()"):
        opt.step()
    opt.train()
    for p, a in zip(model.parameters(), y):
        torch.testing.assert_close(p.detach(), a, rtol=1e-5, atol=1e-6)
    _train(opt, model, steps=1)


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE))
def test_schedule_free_mode_travels_with_the_state_dict(name, tmp_path):
    """A model saved in eval mode holds x; the optimizer loaded with it knows, and ``train()``
    brings back the same y as the original's."""
    model = _model()
    opt = _cls(name)(model.parameters(), lr=1e-2)
    _train(opt, model, steps=5)
    opt.eval()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    twin = _model()
    twin.load_state_dict(saved["model"])
    twin_opt = _cls(name)(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(saved["opt"])
    with pytest.raises(RuntimeError, match="train()"):
        twin_opt.step()
    opt.train()
    twin_opt.train()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_an_eager_soap_step_allocates_no_output_per_matrix():
    # the rotated matrices go through two buffers shared by all of them, and each output is
    # added to its parameter from there: no tensor of a matrix's size is allocated per matrix
    # (before, a step allocated five per matrix: four products and the square root)
    from torch.profiler import profile

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 48, generator=gen)) for _ in range(4)]
    params.append(torch.nn.Parameter(torch.randn(48, generator=gen)))
    opt = hb_optimizers.SOAP(params, lr=0.1, precondition_frequency=100)
    for _ in range(2):  # the initialising call, then a real update
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    with profile(profile_memory=True) as profiler:
        opt.step()
    large = [event.name for event in profiler.events()
             if event.name.startswith("aten::") and event.cpu_memory_usage >= 64 * 48 * 4]
    assert large == ["aten::empty", "aten::empty"]


def test_recipes_compose_with_partitions():
    """A recipe is a transform: SOAP for matrices, in-place AdamW for the rest."""
    model = _model()
    tx = gradchain.chains.partition(
        {"soap": chains.soap(1e-2), "adam": chains.adamw_inplace(1e-2)},
        lambda name, p: "soap" if p.ndim == 2 else "adam")
    opt = gradchain.optimizers.ChainOptimizer(model.named_parameters(), tx)
    losses = _train(opt, model)
    assert losses[-1] < 0.7 * losses[0]
    state = opt.chain_state()
    assert {"soap", "adam"} == set(state)


# ----------------------------------------------------------------------------------------------
# Parity with heavyball 0.8.1 (fp32, scripted gradients; weight decay 0 and warm-up 1 avoid its
# decay-sign and warm-up defects; no basis refresh after the first call, whose eigenvalue-order
# defect would otherwise change the bases)


@pytest.fixture(scope="module")
def heavyball():
    return pytest.importorskip("heavyball")


def _scripted(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * (1 + i % 3) for s in shapes] for i in range(steps)]


def _compare(ours_cls, theirs_cls, ours_kwargs, theirs_kwargs, shapes=((6, 6), (5,)),
             steps=30, lag=0):
    grads = _scripted(shapes, steps + lag)
    start = [torch.randn(s, generator=torch.Generator().manual_seed(9)) for s in shapes]
    a = [torch.nn.Parameter(x.clone()) for x in start]
    b = [torch.nn.Parameter(x.clone()) for x in start]
    ours = _steps(ours_cls(a, **ours_kwargs), a, grads[:steps])
    theirs = _steps(theirs_cls(b, **theirs_kwargs), b, grads[:steps + lag])[lag:]
    for step, (x, y) in enumerate(zip(ours, theirs)):
        for p, q in zip(x, y):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=f"step {step}")


COMMON = dict(lr=0.01, warmup_steps=1, weight_decay=0.0)


@pytest.mark.parametrize("ours, theirs", [("LaProp", "ForeachLaProp"),
                                          ("SFAdamW", "ForeachSFAdamW")])
def test_matches_heavyball(heavyball, ours, theirs):
    _compare(_cls(ours), getattr(heavyball, theirs), COMMON, COMMON)


def test_palm_sfadamw_matches_heavyball_with_its_debiasing(heavyball):
    _compare(_cls("PaLMSFAdamW"), heavyball.PaLMForeachSFAdamW,
             dict(COMMON, heavyball_debias=True), COMMON)


def test_adopt_matches_heavyball_without_its_one_step_lag(heavyball):
    """HeavyBall 0.8 applies each call's moment at the next call (§10 row 20)."""
    _compare(_cls("ADOPT"), heavyball.ForeachADOPT, COMMON, COMMON, lag=1)


@pytest.mark.parametrize("palm", [False, True])
def test_soap_matches_heavyball_between_refreshes(heavyball, palm):
    kwargs = dict(COMMON, precondition_frequency=1000)
    if palm:
        _compare(_cls("PaLMSOAP"), heavyball.PaLMForeachSOAP,
                 dict(kwargs, heavyball_debias=True), kwargs)
    else:
        _compare(_cls("SOAP"), heavyball.ForeachSOAP, kwargs, kwargs)


def test_plain_palm_differs_from_heavyballs_debiased_palm(heavyball):
    with pytest.raises(AssertionError):
        _compare(_cls("PaLMSFAdamW"), heavyball.PaLMForeachSFAdamW, COMMON, COMMON, steps=10)
