"""The command line (``python -m gradchain``) and its embedded task, on the small setting."""

from __future__ import annotations

import doctest
import io
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradchain import chains, cli, transforms
from gradchain.cli import ProgressBar, UsageError, format_bytes, main, resolve_runs
from gradchain.optimizers import OPTIMIZERS
from gradchain.tasks import charlm
from gradchain.tasks.charlm import (
    DEFAULT_HYPERPARAMETERS,
    TaskConfig,
    TrainResult,
    lm_loss,
    load_text,
    make_model,
    state_bytes,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = TaskConfig.small()


def adamw(params) -> torch.optim.Optimizer:
    return OPTIMIZERS["adamw"](params, lr=3e-3)


@pytest.fixture(scope="module")
def small_run() -> TrainResult:
    return train(adamw, SMALL)


def test_list_prints_every_transform_chain_and_optimizer_with_its_summary(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    described = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(transforms.__all__) | set(chains.__all__) | set(OPTIMIZERS) <= described
    assert "Transforms" in out and "Optimizers" in out
    summary = OPTIMIZERS["adamw"].__doc__.strip().splitlines()[0].replace("``", "")
    assert summary in out


def test_compare_as_a_module_prints_both_recipes_and_writes_the_plot(tmp_path):
    plot = tmp_path / "curves.png"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # as conftest.py does
    env.pop("GRADCHAIN_SMALL", None)
    completed = subprocess.run(
        [sys.executable, "-m", "gradchain", "compare", "adamw", "sgd", "--small", "--steps", "20",
         "--plot", str(plot)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    rows = {line.split()[0]: line for line in completed.stdout.splitlines() if line.strip()}
    assert {"adamw", "sgd"} <= rows.keys()
    assert f"lr={DEFAULT_HYPERPARAMETERS['sgd']['lr']:g} momentum=0.9" in rows["sgd"]
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "adamw: step 20/20" in completed.stderr  # not a terminal: plain progress lines


def test_small_environment_variable_selects_the_small_task(monkeypatch):
    monkeypatch.setenv("GRADCHAIN_SMALL", "1")
    assert TaskConfig.from_env(seed=3) == TaskConfig.small(seed=3)
    monkeypatch.delenv("GRADCHAIN_SMALL")
    assert TaskConfig.from_env() == TaskConfig()


def test_unknown_recipe_exits_nonzero_naming_the_available_ones(capsys):
    assert main(["compare", "adamw", "nosuch", "--small"]) == 2
    err = capsys.readouterr().err
    assert "'nosuch'" in err
    assert ", ".join(sorted(OPTIMIZERS)) in err


def test_lr_override_for_a_recipe_not_compared_is_an_error(capsys):
    assert main(["compare", "adamw", "--lr", "sgd=0.1", "--small"]) == 2
    assert "not being compared" in capsys.readouterr().err


def test_malformed_lr_override_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--lr", "sgd"])
    assert exit_info.value.code == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_lr_override_replaces_the_task_default_and_keeps_the_rest():
    (run,) = resolve_runs(["SGD"], {"sgd": 0.5})
    assert run.name == "sgd" and run.cls is OPTIMIZERS["sgd"]
    assert run.hyperparameters == {"lr": 0.5, "momentum": 0.9}


def test_missing_matplotlib_prints_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    plot = tmp_path / "curves.png"
    assert main(["compare", "sgd", "--small", "--steps", "2", "--plot", str(plot)]) == 0
    assert 'pip install "gradchain[plot]"' in capsys.readouterr().out
    assert not plot.exists()


def test_text_is_deterministic_and_read_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_text opened a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    first, second = load_text(50_000), load_text(50_000)
    assert first == second
    assert len(first) == 50_000
    assert "def " in first


def test_same_seed_gives_identical_losses_and_another_seed_does_not(small_run):
    again = train(adamw, SMALL)
    assert again.train_loss == small_run.train_loss
    assert again.val_loss == small_run.val_loss
    assert again.final_train_loss == small_run.final_train_loss
    assert train(adamw, TaskConfig.small(seed=1)).train_loss != small_run.train_loss


def test_loss_decreases_over_a_short_run(small_run):
    assert small_run.val_steps == [0, 20, 40, 60]
    assert small_run.val_loss[0] == pytest.approx(math.log(256), abs=0.1)  # uniform at init
    assert small_run.val_loss[-1] < small_run.val_loss[0] - 1.5
    assert small_run.final_train_loss < small_run.val_loss[0] - 1.5


def test_result_records_times_and_state_size(small_run):
    assert small_run.steps == list(range(1, SMALL.steps + 1))
    assert len(small_run.train_loss) == len(small_run.seconds) == SMALL.steps
    assert small_run.seconds == sorted(small_run.seconds)
    assert 0 < small_run.ms_per_opt_step < small_run.ms_per_step
    n_params = sum(p.numel() for p in make_model(SMALL).parameters())
    assert small_run.state_bytes >= 2 * 4 * n_params  # two float32 moments per parameter


def test_step_fn_replaces_the_default_step():
    calls = []

    def closure_step(model, batch, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = lm_loss(model, batch)
            loss.backward()
            return loss

        calls.append(1)
        return optimizer.step(closure)

    result = train(lambda params: torch.optim.SGD(params, lr=0.1), TaskConfig.small(steps=5),
                   step_fn=closure_step)
    assert len(calls) == 5
    assert all(math.isfinite(loss) for loss in result.train_loss)


def test_state_bytes_counts_a_shared_storage_once():
    buffer = torch.zeros(10)

    class Stub:
        def state_dict(self):
            return {"state": {0: {"a": buffer, "b": buffer[:5]}, 1: {"c": torch.zeros(3)}}}

    assert state_bytes(Stub()) == 4 * 10 + 4 * 3


def test_format_bytes_uses_binary_units():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(107_725) == "105.2 KiB"
    assert format_bytes(3 * 1024**2) == "3.0 MiB"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_one_line_on_a_terminal_and_prints_quarters_elsewhere():
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        with ProgressBar("adamw", stream=stream, width=10) as progress:
            for step in range(1, 9):
                progress(step, 8, 2.5)
    assert terminal.getvalue().startswith("\radamw  [#.........]  1/8  loss 2.500")
    assert terminal.getvalue().endswith("\radamw  [##########]  8/8  loss 2.500\n")
    expected = [f"adamw: step {step}/8  loss 2.500" for step in (2, 4, 6, 8)]
    assert log.getvalue().splitlines() == expected


@pytest.mark.parametrize("module", [cli, charlm])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_train_steps_curvature_optimizers_through_a_closure():
    """An optimizer that uses Hessian-vector products trains with the default step function:
    the task hands it a closure, which it runs with the double-backward graph."""
    from gradchain import chain
    from gradchain.core import GradientTransformation, leaves
    from gradchain.optimizers import ChainOptimizer
    from gradchain.tasks.charlm import TaskConfig, train
    from gradchain.transforms import scale_by_learning_rate

    calls = []

    def update(updates, state, params=None, **extras):
        calls.append(leaves(extras["hvp"](updates))[0].shape)
        return updates, state

    curvature = GradientTransformation(lambda params: (), update, needs_hvp=lambda state: True)
    result = train(lambda params: ChainOptimizer(params, chain(curvature,
                                                               scale_by_learning_rate(1e-3))),
                   TaskConfig.small(steps=3, eval_every=3))
    assert len(calls) == 3 and len(result.train_loss) == 3


@pytest.mark.parametrize("name, key", [
    ("ForeachSOAP", "soap"), ("soap", "soap"), ("PaLMSOAP", "palm-soap"),
    ("precond_schedule_palm_soap", "precond-schedule-palm-soap"),
    ("PrecondScheduleSFPaLMForeachSOAP", "precond-schedule-sf-palm-soap"),
    ("ForeachAdamW", "adamw-inplace"), ("sfadamw", "sfadamw"), ("ADOPT", "adopt"),
])
def test_compare_knows_every_heavyball_name(name, key):
    (run,) = resolve_runs([name], {name: 1e-3})
    assert run.name == key and run.cls is OPTIMIZERS[key] and run.hyperparameters["lr"] == 1e-3


def test_every_seed_name_resolves_to_its_class():
    from gradchain import optimizers

    for seed, key in optimizers.SEED_NAMES.items():
        assert optimizers.OPTIMIZERS[key] is getattr(optimizers, seed)
        assert optimizers.optimizer_name(seed) == key


def test_schedule_free_runs_are_evaluated_at_the_average():
    """The task swaps x in for evaluation (eval/train) and leaves y in place for training."""
    from gradchain.optimizers import SFAdamW
    from gradchain.tasks.charlm import TaskConfig, train

    calls = []

    class Spy(SFAdamW):
        def eval(self):
            calls.append("eval")
            super().eval()

        def train(self):
            calls.append("train")
            super().train()

    result = train(lambda params: Spy(params, lr=1e-2), TaskConfig.small(steps=20))
    assert calls[:2] == ["eval", "train"] and len(calls) == 2 * (len(result.val_loss) + 1)


def test_mechanize_prefix_runs_any_recipe_under_mechanic():
    from gradchain.optimizers import Mechanized

    plain, mechanized, seed_named = resolve_runs(
        ["adamw", "mechanize:AdamW", "Mechanize:ForeachSOAP"], {"mechanize:soap": 0.5})
    assert plain.cls is OPTIMIZERS["adamw"] and plain.hyperparameters["lr"] == 1e-3
    assert mechanized.name == "mechanize:adamw" and issubclass(mechanized.cls, Mechanized)
    assert issubclass(mechanized.cls, OPTIMIZERS["adamw"])
    assert mechanized.hyperparameters["lr"] == 1.0  # the base step Mechanic scales
    assert seed_named.name == "mechanize:soap" and seed_named.hyperparameters["lr"] == 0.5
    with pytest.raises(UsageError, match="mechanize:<recipe>"):
        resolve_runs(["mechanize:nope"], {})


def test_validated_optimizers_train_on_less_and_get_a_held_out_validation_closure(monkeypatch):
    """RTHO/MARTHE: the last 10% of the training split is cut off and only ever reaches the
    optimizer through ``val_closure``, on every step."""
    from gradchain.optimizers import MARTHE

    splits = []
    real_batches = charlm._batches

    def recording_batches(data, config, generator):
        splits.append(data)
        return real_batches(data, config, generator)

    monkeypatch.setattr(charlm, "_batches", recording_batches)
    val_losses = []

    class Spy(MARTHE):
        def step(self, closure=None, val_closure=None, val_grads=None):
            val_losses.append(val_closure().item())
            return super().step(closure, val_closure=val_closure)

    config = TaskConfig.small(steps=4, eval_every=4)
    result = train(lambda params: Spy(params, lr=0.01, hyper_lr=1e-4), config)
    train_data, _ = charlm._splits(config.max_chars)
    held_out, trained_on = splits[-2], splits[-1]
    assert len(trained_on) + len(held_out) == len(train_data)
    assert torch.equal(torch.cat([trained_on, held_out]), train_data)
    assert len(val_losses) == 4 and all(math.isfinite(v) for v in val_losses)
    assert len(result.train_loss) == 4
    # an optimizer without validation trains on the whole split
    splits.clear()
    train(lambda params: torch.optim.SGD(params, lr=0.1), config)
    assert len(splits[-1]) == len(train_data)


@pytest.mark.parametrize("name", ["hd-sgd", "hd-adam", "rtho", "marthe", "HDSGD", "MARTHE"])
def test_compare_knows_the_hypergradient_recipes_and_has_their_tuned_defaults(name):
    from gradchain.optimizers import optimizer_name

    (run,) = resolve_runs([name], {})
    key = optimizer_name(name)
    assert run.cls is OPTIMIZERS[key] and run.hyperparameters == {
        **charlm.DEFAULT_HYPERPARAMETERS[key]}
