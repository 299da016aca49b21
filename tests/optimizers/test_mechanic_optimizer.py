"""optimizers.mechanic.mechanize (ALGORITHMS.md §6, §8.3): any torch.optim.Optimizer class under
Mechanic. Parity with ``mechanic_pytorch`` and with the chain, training with foreign and
gradchain bases, closures, Hessian-vector products, param groups, schedulers, hooks and
state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch

from gradchain.chains import chain
from gradchain.chains.esgd import esgd_m
from gradchain.chains.mechanic import mechanize as mechanize_recipe
from gradchain.core import apply_updates
from gradchain.optimizers import ESGD, SOAP, AdamW, ChainOptimizer
from gradchain.optimizers.mechanic import Mechanized, mechanize
from gradchain.transforms import scale_by_learning_rate
from gradchain.transforms.mechanic import DEFAULT_BETAS, mechanic_scale

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.randn(8, 1, generator=torch.Generator().manual_seed(1)) \
    + 0.1 * torch.randn(64, 1, generator=torch.Generator().manual_seed(2))


def _model(seed: int = 1, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 1)).to(dtype)


def _loss(model) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(X.to(dtype)), Y.to(dtype))


def _train(model, opt, steps: int, closure: bool = False, scheduler=None) -> list[float]:
    losses = []
    for _ in range(steps):
        def evaluate():
            opt.zero_grad()
            loss = _loss(model)
            loss.backward()
            return loss
        if closure:
            loss = opt.step(evaluate)
        else:
            loss = evaluate()
            opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("store_delta", [False, True])
def test_pytorch_variant_matches_mechanic_pytorch_with_two_param_groups(store_delta):
    mechanic_pytorch = pytest.importorskip("mechanic_pytorch")
    models = [_model(), _model()]

    def groups(model):
        first, second = model[0], model[2]
        return [{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.3}]

    ref = mechanic_pytorch.mechanize(torch.optim.SGD, store_delta=store_delta)(
        groups(models[0]), lr=1.0, momentum=0.9)
    ours = mechanize(torch.optim.SGD, variant="pytorch", store_delta=store_delta)(
        groups(models[1]), lr=1.0, momentum=0.9)
    worst = 0.0
    for step in range(60):  # the same gradient sequence for both: the reference's
        ref.zero_grad()
        _loss(models[0]).backward()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            q.grad = p.grad.clone()
        ref.step()
        ours.step()
        expected, got = _flat(models[0].parameters()), _flat(models[1].parameters())
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    assert worst < 1e-5
    assert ours.scale == pytest.approx(float(ref.state["_mechanic"]["s"].sum()), rel=1e-4)
    assert ours.scale > 1e3 * 1e-8  # it learned a scale


def test_default_variant_equals_the_chain_with_mechanic_scale():
    model, twin = _model(), _model()
    opt = mechanize(torch.optim.SGD)(model.parameters(), lr=0.5)
    params = [p.detach().clone() for p in twin.parameters()]
    tx = chain(scale_by_learning_rate(0.5), mechanic_scale())
    state = tx.init(params)
    for _ in range(20):
        opt.zero_grad()
        _loss(model).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        out, state = tx.update(grads, state, params)
        apply_updates(params, out)
        torch.testing.assert_close(_flat(model.parameters()), _flat(params), rtol=1e-6,
                                   atol=1e-7)
    assert opt.scale == pytest.approx(float(state[-1].s.sum()), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Training


def test_mechanized_rmsprop_trains():
    model = _model()
    opt = mechanize(torch.optim.RMSprop)(model.parameters(), lr=1.0)
    losses = _train(model, opt, 100)
    assert losses[-1] < 0.2 * losses[0] and losses[-1] < losses[50] < losses[0]
    assert isinstance(opt, torch.optim.RMSprop) and type(opt).__name__ == "MechanizedRMSprop"


@pytest.mark.parametrize("store_delta, lrs", [
    (True, [1e-3, 1e-2, 1e-1, 1.0, 10.0]),
    # float32 parameters cannot hold displacements of lr * s_init = 1e-9: the recovered delta
    # is then 0 and Mechanic does not start; one decade higher it does
    (False, [1e-2, 1e-1, 1.0, 10.0]),
])
def test_mechanized_sgd_reaches_the_same_loss_over_four_decades_of_lr(store_delta, lrs):
    def losses(cls, lr):
        torch.manual_seed(1)
        model = torch.nn.Linear(8, 1)
        return _train(model, cls(model.parameters(), lr=lr), 150)

    initial = losses(torch.optim.SGD, 0.0)[0]
    mechanized = [losses(mechanize(torch.optim.SGD, store_delta=store_delta), lr)[-1]
                  for lr in lrs]
    assert max(mechanized) < 0.05 * initial and max(mechanized) < 10 * min(mechanized), \
        mechanized
    plain = [losses(torch.optim.SGD, lr)[-1] for lr in lrs]  # the range is not easy for SGD
    assert not all(loss < 0.05 * initial for loss in plain), plain


# ----------------------------------------------------------------------------------------------
# gradchain bases: closures, curvature, groups, schedulers, checkpoints


def test_mechanized_gradchain_soap_with_closure_param_groups_and_scheduler():
    model = _model()
    cls = mechanize(SOAP)
    opt = cls([{"params": list(model[0].parameters())},
               {"params": list(model[2].parameters()), "lr": 0.5}], lr=1.0,
              precondition_frequency=2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    losses = _train(model, opt, 40, closure=True, scheduler=scheduler)
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < losses[20]
    assert [g["lr"] for g in opt.param_groups] == [0.0625, 0.03125]
    assert isinstance(opt, SOAP) and isinstance(opt, Mechanized)
    assert len(opt._mechanic_state.x_ref) == 4  # one scale over both groups


def test_closure_is_evaluated_once_and_then_replayed_to_the_base():
    model = _model()
    calls = []

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            loss = closure()
            calls.append(("base", float(loss.detach())))
            super().step()
            return loss

    opt = mechanize(CountingSGD)(model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        calls.append(("closure", float(loss.detach())))
        return loss

    loss = opt.step(closure)
    assert [c[0] for c in calls] == ["closure", "base"] and calls[0][1] == calls[1][1]
    assert float(loss.detach()) == calls[0][1]


def test_curvature_base_gets_the_double_backward_graph_from_a_closure():
    # ESGD needs Hessian-vector products; wrapped, it must equal the mechanized recipe run by
    # ChainOptimizer (same probes, same math).
    model, twin = _model(), _model()
    opt = mechanize(ESGD)(model.parameters(), lr=1.0, d_warmup=2, update_d_every=3)
    assert opt.needs_hvp()

    reference = ChainOptimizer(twin.parameters(), mechanize_recipe(esgd_m), lr=1.0,
                               update_d_every=3, d_warmup=2)
    start = _flat(model.parameters())
    _train(model, opt, 12, closure=True)
    _train(twin, reference, 12, closure=True)
    moved = _flat(model.parameters()) - start
    torch.testing.assert_close(moved, _flat(twin.parameters()) - start, rtol=1e-4,
                               atol=1e-4 * moved.abs().max().item())
    assert moved.abs().max() > 1e-5


def _round_trip(make, steps_before: int = 5, steps_after: int = 5) -> tuple[torch.Tensor, ...]:
    """Parameters of an uninterrupted run and of a run saved, loaded into a fresh optimizer
    (through torch.save / torch.load(weights_only=True)) and continued."""
    model = _model()
    opt = make(model.parameters())
    _train(model, opt, steps_before + steps_after)

    model2 = _model()
    opt2 = make(model2.parameters())
    _train(model2, opt2, steps_before)
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model3 = _model(seed=7)
    model3.load_state_dict(saved["model"])
    opt3 = make(model3.parameters())
    opt3.load_state_dict(saved["opt"])
    _train(model3, opt3, steps_after)
    return _flat(model.parameters()), _flat(model3.parameters()), saved["opt"]


@pytest.mark.parametrize("base, store_delta", [(torch.optim.AdamW, False),
                                               (torch.optim.AdamW, True), (AdamW, False)])
def test_state_dict_round_trip_continues_bit_identically(base, store_delta):
    cls = mechanize(base, store_delta=store_delta)
    uninterrupted, resumed, saved = _round_trip(lambda params: cls(params, lr=1.0))
    assert torch.equal(uninterrupted, resumed)
    assert set(saved["state"]) == {0, 1, 2, 3} and set(saved) == {"state", "param_groups"}
    for entry in saved["state"].values():
        ours = {key for key in entry if key.startswith("mechanized.")}
        assert ours == {f"mechanized.{key}" for key in ("x_ref", "count", "s", "m", "v", "r",
                                                          "delta")}
        assert entry["mechanized.count"] == 5
        assert (entry["mechanized.delta"] is not None) == store_delta


def test_a_wrong_checkpoint_is_refused():
    cls = mechanize(torch.optim.SGD, store_delta=True)
    model = _model()
    opt = mechanize(torch.optim.SGD)(model.parameters(), lr=1.0)
    _train(model, opt, 2)
    fresh = cls(_model().parameters(), lr=1.0)
    with pytest.raises(ValueError, match="store_delta=False"):
        fresh.load_state_dict(opt.state_dict())


# ----------------------------------------------------------------------------------------------
# Optimizer contract


def test_params_without_grad_are_skipped_and_groups_added_later_join_the_scale():
    model = _model()
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = mechanize(torch.optim.SGD)([{"params": model.parameters()},
                                      {"params": [frozen]}], lr=1.0)
    _train(model, opt, 3)
    assert torch.equal(frozen, torch.ones(3))
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 1.0})
    scale_before = opt.scale
    extra.grad = torch.ones(2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert len(opt._mechanic_state.x_ref) == 6 and torch.equal(frozen, torch.ones(3))
    # the new parameter starts at its x_ref and moves by S_new * u
    torch.testing.assert_close(extra.detach(), -opt.scale * torch.ones(2))
    assert opt.scale != scale_before


def test_step_hooks_run_once_per_step_even_when_the_base_step_is_hooked():
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # hooks SGD.step
    model = _model()
    opt = mechanize(torch.optim.SGD)(model.parameters(), lr=1.0)
    scales = []
    opt.register_step_post_hook(lambda optimizer, args, kwargs: scales.append(optimizer.scale))
    assert opt.scale is None
    _train(model, opt, 3)
    assert len(scales) == 3 and scales[0] == pytest.approx(1e-6, rel=1e-5)


def test_bfloat16_parameters_keep_float32_scalars_and_train_with_store_delta():
    # bfloat16 cannot hold the first steps (lr * s_init ~ 1e-6): only the stored delta sees them
    model = _model(dtype=torch.bfloat16)
    opt = mechanize(torch.optim.SGD, store_delta=True)(model.parameters(), lr=1.0)
    losses = _train(model, opt, 60)
    state = opt._mechanic_state
    assert state.s.dtype == torch.float32 and state.x_ref[0].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_the_same_arguments_give_the_same_class_and_others_another():
    assert mechanize(torch.optim.SGD) is mechanize(torch.optim.SGD, betas=list(DEFAULT_BETAS))
    assert mechanize(torch.optim.SGD, s_decay=0.0) is not mechanize(torch.optim.SGD)


def test_mechanize_refuses_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="torch.optim.Optimizer class"):
        mechanize(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(ValueError, match="already mechanized"):
        mechanize(mechanize(torch.optim.SGD))
    with pytest.raises(ValueError, match="s_init must be > 0"):
        mechanize(torch.optim.SGD, s_init=0.0)


def test_a_base_that_changes_grad_in_place_does_not_change_what_mechanic_sees():
    class HalvingSGD(torch.optim.Optimizer):
        """SGD that halves .grad in place before using it."""

        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.mul_(0.5)
                    p.add_(p.grad, alpha=-group["lr"])

    def trained(cls, lr):
        torch.manual_seed(3)
        model = torch.nn.Linear(8, 1)
        opt = mechanize(cls)(model.parameters(), lr=lr)
        _train(model, opt, 30)
        return _flat(model.parameters()), opt.scale

    halving, halving_scale = trained(HalvingSGD, 0.2)
    plain, plain_scale = trained(torch.optim.SGD, 0.1)
    assert torch.equal(halving, plain) and halving_scale == plain_scale


def test_a_step_without_any_gradient_runs_the_base_and_keeps_no_state():
    model = torch.nn.Linear(3, 1)
    opt = mechanize(torch.optim.SGD)(model.parameters(), lr=1.0)
    before = _flat(model.parameters())
    opt.step()
    assert opt.scale is None and torch.equal(_flat(model.parameters()), before)


@pytest.mark.parametrize("store_delta", [False, True])
def test_pieces_give_the_whole_parameter_result(store_delta, monkeypatch):
    """The passes run over flat pieces (ragged last piece here) and over whole tensors where a
    parameter is not contiguous; the trajectory is the whole-tensor one up to the order of the
    sums."""
    import gradchain.optimizers.mechanic as mechanic_module

    def run(piece: int) -> list[torch.Tensor]:
        monkeypatch.setattr(mechanic_module, "_PIECE_ELEMENTS", piece)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64, generator=gen)),
                  torch.nn.Parameter(torch.randn(4, 7, dtype=torch.float64, generator=gen).T)]
        assert not params[1].is_contiguous()
        opt = mechanize(torch.optim.AdamW, store_delta=store_delta)(params, lr=0.1)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params] + [torch.tensor(opt.scale)]

    for pieces, whole in zip(run(7), run(1 << 30)):
        torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-14)
        assert not torch.equal(pieces, torch.zeros_like(pieces))


@pytest.mark.parametrize("store_delta", [False, True])
def test_temporaries_are_sized_to_the_largest_piece_and_grow_for_a_larger_one(store_delta,
                                                                             monkeypatch):
    """The reused temporaries are as large as the largest piece of the step (not a whole
    piece's 2^18 elements for tiny parameters); a param group added later with larger pieces
    replaces them, and the numbers are those of temporaries allocated afresh every time."""
    import gradchain.optimizers.mechanic as mechanic_module

    monkeypatch.setattr(mechanic_module, "_PIECE_ELEMENTS", 64)
    temporary = mechanic_module._temporary

    def run(reuse: bool) -> tuple[list[torch.Tensor], list[int]]:
        scratches: list[dict] = []

        def recorded(scratch, like, slot):
            scratches.append(scratch)
            return temporary(scratch, like, slot) if reuse else None

        monkeypatch.setattr(mechanic_module, "_temporary", recorded)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape, generator=gen))
                  for shape in ((3, 4), (5,), (20, 10))]  # 12, 5, then 64 + 64 + 64 + 8
        opt = mechanize(torch.optim.AdamW, store_delta=store_delta)(params[:2], lr=0.1)
        largest = []
        for t in range(6):
            if t == 3:
                opt.add_param_group({"params": [params[2]], "lr": 0.05})
            scratches.clear()
            _scripted(opt, [p for g in opt.param_groups for p in g["params"]], 1, seed=t)
            largest.append(max((b.numel() for s in scratches for b in s.values()), default=0))
        return [p.detach().clone() for p in params] + [torch.tensor(opt.scale)], largest

    reused, largest = run(True)
    fresh, _ = run(False)
    assert largest == [12] * 3 + [64] * 3
    assert all(torch.equal(a, b) for a, b in zip(reused, fresh))


# ----------------------------------------------------------------------------------------------
# keep_copy: the copy of the parameters kept between steps


def _scripted(opt, params, steps, seed=5):
    """Steps on scripted gradients; the last parameter gets none on odd steps."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == len(params) - 1 and t % 2) else \
                torch.randn(p.shape, generator=gen)
        opt.step()


def test_keep_copy_gives_the_same_numbers_and_copies_start_without_its_buffers():
    import copy

    def run(keep_copy):
        params = [torch.nn.Parameter(t) for t in
                  (torch.ones(64, 32), torch.full((32,), 0.5), torch.zeros(5))]
        opt = mechanize(torch.optim.AdamW, keep_copy=keep_copy)(params[:2], lr=1.0,
                                                                 weight_decay=0.1)
        _scripted(opt, params[:2], 3)
        opt.add_param_group({"params": [params[2]], "lr": 0.5})
        _scripted(opt, params, 4)
        return params, opt

    (plain, _), (kept, opt) = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(plain, kept))
    assert sorted(opt._kept) == [0, 1, 2]
    twin = copy.deepcopy(opt)  # no shared buffer: the copy makes its own, and continues alike
    assert twin._kept is None
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    _scripted(opt, kept, 2, seed=9)
    _scripted(twin, twin_params, 2, seed=9)
    assert all(torch.equal(p, q) for p, q in zip(kept, twin_params))


@pytest.mark.parametrize("keep_copy", [False, True])
def test_a_step_allocates_the_copy_of_the_parameters_unless_it_is_kept(keep_copy):
    from torch.profiler import profile

    # larger than a piece (2^18 elements), so that the temporaries, a piece each, are smaller
    # than a copy; SGD itself allocates nothing
    param = torch.nn.Parameter(torch.ones(640, 512))
    opt = mechanize(torch.optim.SGD, keep_copy=keep_copy)([param], lr=1.0)
    _scripted(opt, [param], 2)
    param.grad = torch.ones_like(param)
    with profile(profile_memory=True) as profiler:
        opt.step()
    copies = [event.name for event in profiler.events()
              if event.name.startswith("aten::") and event.cpu_memory_usage == 640 * 512 * 4]
    assert (copies == []) if keep_copy else ("aten::empty_like" in copies)


def test_keep_copy_must_be_a_bool():
    with pytest.raises(ValueError, match="keep_copy"):
        mechanize(torch.optim.SGD, keep_copy="yes")
