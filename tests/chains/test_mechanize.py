"""chains.mechanic.mechanize (ALGORITHMS.md §8.3): a transform or a recipe under
mechanic_scale, its signature as ChainOptimizer sees it, terminal bases, checkpoints."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

from gradchain.chains import adamw, chain, esgd_m, sfadamw
from gradchain.chains.mechanic import mechanize
from gradchain.core import apply_updates
from gradchain.optimizers import ChainOptimizer
from gradchain.transforms import scale_by_adam, scale_by_learning_rate, schedule_free
from gradchain.transforms.mechanic import mechanic_scale, mechanic_scale_value


def _run(tx, steps: int = 15, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=gen, dtype=torch.float64),
              torch.randn(3, generator=gen, dtype=torch.float64)]
    state = tx.init(params)
    for _ in range(steps):
        grads = [p + 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        out, state = tx.update(grads, state, params)
        apply_updates(params, out)
    return params


def test_mechanize_of_a_transform_is_the_base_then_mechanic_scale():
    tx = mechanize(chain(scale_by_adam(), scale_by_learning_rate(1.0)), s_decay=0.0,
                   variant="pytorch")
    assert tx.terminal
    expected = _run(chain(scale_by_adam(), scale_by_learning_rate(1.0),
                          mechanic_scale(s_decay=0.0, variant="pytorch")))
    got = _run(tx)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(got[0], _run(mechanize(scale_by_learning_rate(1.0)))[0])
    state = tx.init([torch.zeros(2)])
    assert set(state) == {"base", "mechanic"}  # checkpoint keys base.*, mechanic.*


def test_mechanized_recipe_takes_the_base_hyperparameters_then_mechanics():
    recipe = mechanize(adamw, s_init=1e-7)
    assert recipe.__name__ == "mechanize_adamw" and "adamw" in recipe.__doc__
    parameters = inspect.signature(recipe).parameters
    base = list(inspect.signature(adamw).parameters)
    assert list(parameters) == base + ["s_decay", "betas", "s_init", "mechanic_eps",
                                       "store_delta", "variant"]
    assert parameters["s_init"].default == 1e-7 and parameters["eps"].default == 1e-8
    mech = recipe(learning_rate=1.0, s_decay=0.0, mechanic_eps=1e-6).init([torch.zeros(2)])
    assert mech["mechanic"].s.tolist() == pytest.approx([1e-7] * 6)
    # the base's eps goes to the base, Mechanic's to Mechanic
    ours = _run(recipe(1.0, eps=1e-3, mechanic_eps=1e-6, s_decay=0.0))
    expected = _run(chain(adamw(1.0, eps=1e-3),
                          mechanic_scale(s_decay=0.0, s_init=1e-7, eps=1e-6)))
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_mechanized_recipe_under_chain_optimizer_trains_and_round_trips_a_checkpoint():
    def make(model):
        return ChainOptimizer(model.parameters(), mechanize(adamw), lr=1.0, weight_decay=0.0,
                              store_delta=True)

    def train(model, opt, steps):
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(steps):
            x = torch.randn(32, 5, generator=gen)
            opt.zero_grad()
            loss = (model(x) - x[:, :2]).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    opt = make(model)
    assert opt.param_groups[0]["store_delta"] is True and opt.param_groups[0]["s_decay"] == 0.01
    losses = train(model, opt, 60)
    assert losses[-1] < 0.5 * losses[0]
    assert mechanic_scale_value(opt.chain_state()) > 1e-4
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert {"mechanic.x_ref", "mechanic.delta", "mechanic.s"} <= set(saved["state"][0])
    resumed = make(model)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.chain_state()["mechanic"].s, opt.chain_state()["mechanic"].s)


def test_a_terminal_base_is_refused():
    with pytest.raises(ValueError, match="terminal"):
        mechanize(schedule_free(scale_by_learning_rate(0.1), 0.1))
    with pytest.raises(ValueError, match="terminal"):
        mechanize(mechanize(scale_by_learning_rate(1.0)))
    with pytest.raises(ValueError, match="terminal"):  # a recipe, when it is built
        ChainOptimizer([torch.nn.Parameter(torch.zeros(2))], mechanize(sfadamw), lr=1.0)


def test_options_are_validated_at_once_and_non_transforms_refused():
    with pytest.raises(ValueError, match="betas is empty"):
        mechanize(esgd_m, betas=())
    with pytest.raises(TypeError, match="GradientTransformation or a recipe"):
        mechanize(0.1)


@pytest.mark.parametrize("keep_copy", [True, False])
def test_keep_copy_is_refused_for_a_transform_or_a_recipe_with_the_fix(keep_copy):
    import gradchain
    from gradchain.optimizers import Mechanized

    for entry in (mechanize, gradchain.mechanize):
        for base in (adamw, chain(scale_by_adam(), scale_by_learning_rate(1.0))):
            with pytest.raises(TypeError, match="keep_copy is an option of mechanized optimizer "
                               "classes only.*keeps no copy.*drop keep_copy, or mechanize a "
                               "torch.optim.Optimizer class"):
                entry(base, keep_copy=keep_copy)
    assert issubclass(gradchain.mechanize(torch.optim.SGD, keep_copy=keep_copy), Mechanized)


def test_top_level_mechanize_dispatches_on_what_it_is_given():
    import gradchain
    from gradchain.optimizers import SOAP, Mechanized

    for cls in (torch.optim.SGD, SOAP):
        mechanized = gradchain.mechanize(cls, s_decay=0.0)
        assert issubclass(mechanized, cls) and issubclass(mechanized, Mechanized)
    recipe = gradchain.mechanize(adamw, s_init=1e-7)
    assert recipe.__name__ == "mechanize_adamw"
    assert inspect.signature(recipe).parameters["s_init"].default == 1e-7
    tx = gradchain.mechanize(chain(scale_by_adam(), scale_by_learning_rate(1.0)))
    assert tx.terminal and torch.equal(_run(tx)[0], _run(mechanize(
        chain(scale_by_adam(), scale_by_learning_rate(1.0))))[0])
    with pytest.raises(TypeError, match="GradientTransformation or a recipe"):
        gradchain.mechanize(3)
    with pytest.raises(ValueError, match="s_init"):
        gradchain.mechanize(torch.optim.SGD, s_init=0.0)
