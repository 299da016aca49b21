"""A small character-level transformer language model on Python's own standard library.

The embedded task behind ``python -m gradchain compare``, the benchmarks and the notebooks: it
needs no download, trains in seconds to minutes on a CPU, and is the same for every recipe.

Data
    A fixed, sorted list of standard-library modules (:data:`STDLIB_FILES`, read from
    ``sysconfig.get_paths()["stdlib"]``), decoded as UTF-8 with ``errors="replace"``,
    concatenated and cut to ``max_chars`` characters. Tokens are the UTF-8 bytes of that text
    (vocabulary 256, no vocabulary to build or ship). The last 10% is the validation split. A
    module that an interpreter lacks is skipped, so the text is fixed for a given Python
    installation.

Model
    Token and position embeddings, ``n_layers`` pre-LayerNorm blocks (causal self-attention,
    then a GELU MLP of width ``4 * d_model``), a final LayerNorm and an output head *tied* to the
    token embedding (fewer parameters, and the usual choice for small language models). Weights
    start at N(0, 0.02), biases at zero, from ``config.seed``. There is no dropout, so a step
    is a deterministic function of the parameters and the batch.

    Attention runs on PyTorch's *math* backend of ``scaled_dot_product_attention``: on a CPU it
    is as fast as the fused kernel at these sizes, and unlike that kernel it can be
    differentiated twice, which recipes that need Hessian-vector products
    (``backward(create_graph=True)``) rely on.

Example:
    >>> from gradchain.tasks.charlm import TaskConfig, train
    >>> result = train(lambda params: torch.optim.AdamW(params, lr=3e-3), TaskConfig.small())
    >>> result.final_val_loss < 5.0
    True
"""

from __future__ import annotations

import os
import statistics
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "STDLIB_FILES",
    "VOCAB_SIZE",
    "DEFAULT_HYPERPARAMETERS",
    "TaskConfig",
    "TrainResult",
    "load_text",
    "make_model",
    "lm_loss",
    "default_step",
    "closure_step",
    "validation_step",
    "state_bytes",
    "train",
]

#: The standard-library modules the text is made of, in this order.
STDLIB_FILES: tuple[str, ...] = (
    "abc.py",
    "argparse.py",
    "ast.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "heapq.py",
    "inspect.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "operator.py",
    "pprint.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
    "typing.py",
    "uuid.py",
)

#: Byte-level tokens.
VOCAB_SIZE = 256

#: Hyperparameters of the named recipes on this task (``gradchain compare`` builds
#: ``OPTIMIZERS[name](params, **DEFAULT_HYPERPARAMETERS[name])``). Learning rates: the best final
#: validation loss of the default TaskConfig over a grid (adamw 5e-4, 1e-3, 2e-3, 3e-3; sgd 0.01,
#: 0.03, 0.05, 0.07, 0.1); adam takes adamw's. A recipe not listed runs with its class
#: defaults.
DEFAULT_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "adamw": {"lr": 1e-3},
    "adam": {"lr": 1e-3},
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "esgd": {"lr": 0.5},  # the class default, 1.0, diverges on this task
    "sm3": {"lr": 0.003},  # 400-step grid: 0.001 2.89, 0.003 2.45, 0.01 2.48, 0.03 2.62, 0.1 2.83
    # hypergradient methods: a deliberately low start and the best hyper-learning rate of the
    # 400-step grid of benchmarks/hypergrad.py
    "hd-sgd": {"lr": 0.02, "momentum": 0.9, "hypergrad_lr": 3e-5},
    "hd-adam": {"lr": 3e-4, "hypergrad_lr": 3e-7},
    "rtho": {"lr": 0.02, "hyper_lr": 1e-6},
    "marthe": {"lr": 0.02, "hyper_lr": 1e-6, "mu": 0.99, "alpha": 0.0},
}

#: What ``optimizer_factory`` receives: ``(name, parameter)`` pairs, as from
#: ``model.named_parameters()``, which every ``torch.optim.Optimizer`` accepts.
NamedParams = list[tuple[str, nn.Parameter]]
Batch = tuple[Tensor, Tensor]
OptimizerFactory = Callable[[NamedParams], torch.optim.Optimizer]
StepFn = Callable[[nn.Module, Batch, torch.optim.Optimizer], Tensor | float]
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TaskConfig:
    """Sizes, schedule and seed of the character-level language-model task.

    The defaults make ``python -m gradchain compare`` (two recipes) take about two minutes on
    two CPU threads; :meth:`small` is a seconds-long version for tests and notebooks, and
    :meth:`from_env` picks it when ``GRADCHAIN_SMALL=1``.

    Example:
        >>> TaskConfig(steps=100).d_model
        128
    """

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    eval_every: int = 50
    eval_batches: int = 4
    max_chars: int = 1_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "d_model", "n_layers", "n_heads",
                     "eval_every", "eval_batches", "max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @classmethod
    def small(cls, **overrides: Any) -> TaskConfig:
        """A tiny model and a short run (a second or two), for tests and quick notebook cells."""
        sizes = dict(steps=60, batch_size=16, seq_len=32, d_model=32, n_layers=1, n_heads=2,
                     eval_every=20, eval_batches=2, max_chars=200_000)
        return cls(**{**sizes, **overrides})

    @classmethod
    def from_env(cls, **overrides: Any) -> TaskConfig:
        """:meth:`small` when the environment sets ``GRADCHAIN_SMALL=1``, else the defaults."""
        small = os.environ.get("GRADCHAIN_SMALL", "").strip().lower() in {"1", "true", "yes"}
        return cls.small(**overrides) if small else cls(**overrides)


@dataclass
class TrainResult:
    """What one training run measured.

    ``steps``/``train_loss``/``seconds`` have one entry per step: the minibatch loss of that step
    and the training wall time (evaluations excluded) from the start to its end.
    ``val_steps``/``val_loss``/``val_seconds`` are the evaluations, at step 0, every
    ``eval_every`` steps and at the last step. ``final_train_loss`` and ``final_val_loss`` are
    mean losses of the final model on ``eval_batches`` fixed batches of each split.
    ``ms_per_step`` is the median time of a whole step (zero_grad, forward, backward and
    optimizer step, or whatever ``step_fn`` does); ``ms_per_opt_step`` the median time inside
    ``optimizer.step`` alone (including a closure, if the step passes one). ``state_bytes`` is the
    size of the optimizer state (see :func:`state_bytes`). Defaults: empty lists, NaN for the
    measurements that did not happen, 0 state bytes.

    Example:
        >>> run = TrainResult(steps=[1, 2], train_loss=[5.2, 4.9], seconds=[0.1, 0.2])
        >>> run.train_loss[-1], run.final_val_loss  # NaN until train measures it
        (4.9, nan)
    """

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    final_train_loss: float = float("nan")
    final_val_loss: float = float("nan")
    ms_per_step: float = float("nan")
    ms_per_opt_step: float = float("nan")
    state_bytes: int = 0


def load_text(max_chars: int = 1_000_000) -> str:
    """The task's text: the modules of :data:`STDLIB_FILES`, concatenated, cut to ``max_chars``.

    Reads only local files of the running interpreter, never the network.

    Example:
        >>> load_text(1000) == load_text(1000)
        True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for name in STDLIB_FILES:
        path = root / name
        if size >= max_chars:
            break
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
            size += len(parts[-1])
    if not parts:
        raise FileNotFoundError(f"none of the task's standard-library files were found in {root}")
    return "".join(parts)[:max_chars]


def _splits(max_chars: int) -> tuple[Tensor, Tensor]:
    """The byte tokens of the text, split 90% / 10% into training and validation."""
    data = torch.frombuffer(bytearray(load_text(max_chars).encode("utf-8")), dtype=torch.uint8)
    n_val = max(len(data) // 10, 1)
    return data[:-n_val], data[-n_val:]


def _batches(data: Tensor, config: TaskConfig, generator: torch.Generator) -> Iterator[Batch]:
    """Endless random windows of ``seq_len + 1`` tokens, as (inputs, next-token targets)."""
    if len(data) <= config.seq_len:
        raise ValueError(f"a split of {len(data)} tokens is too short for seq_len={config.seq_len}")
    windows = data.unfold(0, config.seq_len + 1, 1)
    while True:
        starts = torch.randint(len(windows), (config.batch_size,), generator=generator)
        chunk = windows[starts].long()
        yield chunk[:, :-1], chunk[:, 1:]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (math backend, twice differentiable)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        qkv = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        q, k, v = qkv.unbind(0)
        with sdpa_kernel(SDPBackend.MATH):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Byte-level transformer language model with an output head tied to the token embedding."""

    def __init__(self, config: TaskConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB_SIZE, config.d_model)
        self.pos = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.Sequential(
            *(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, VOCAB_SIZE, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits ``(batch, time, 256)`` for token ids ``(batch, time)``."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def make_model(config: TaskConfig) -> nn.Module:
    """The task's model, initialised from ``config.seed`` (torch's global RNG is left untouched).

    Example:
        >>> model = make_model(TaskConfig.small())
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = CharTransformer(config)
        model.apply(_init_weights)
    return model


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    r"""Mean next-token cross-entropy (nats) of ``model`` on ``batch = (inputs, targets)``.

    .. math::  L = -\frac{1}{BT} \sum_{b,t} \log \mathrm{softmax}(z_{b,t})_{y_{b,t}}

    with z the logits ``model(inputs)`` of shape (B, T, vocabulary) and y the targets.

    Example:
        >>> model = make_model(TaskConfig.small())
        >>> inputs = torch.zeros(2, 8, dtype=torch.long)
        >>> f"{lm_loss(model, (inputs, inputs + 1)).item():.1f}"  # near ln 256 = 5.55 at first
        '5.4'
    """
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(
        rearrange(logits, "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)")
    )


def train_batches(config: TaskConfig, count: int, seed: int = 0) -> list[Batch]:
    """``count`` training batches of the task, drawn with ``seed`` (for benchmarks).

    Example:
        >>> x, y = train_batches(TaskConfig.small(), 1)[0]
        >>> x.shape == y.shape == (TaskConfig.small().batch_size, TaskConfig.small().seq_len)
        True
    """
    train_data, _ = _splits(config.max_chars)
    return list(islice(_batches(train_data, config, torch.Generator().manual_seed(seed)), count))


def default_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> Tensor:
    """One plain step: ``zero_grad``, forward, ``loss.backward()``, ``optimizer.step()``.
    Returns the loss before the step.

    Example:
        >>> model = nn.Embedding(VOCAB_SIZE, VOCAB_SIZE)  # a bigram model: next-byte logits
        >>> _ = nn.init.zeros_(model.weight)              # uniform: the loss is ln 256
        >>> batch = (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> [round(default_step(model, batch, opt).item(), 3) for _ in range(2)]
        [5.545, 4.552]
    """
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model, batch)
    loss.backward()
    optimizer.step()
    return loss


def closure_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> Tensor:
    """One step through a closure, for optimizers that use Hessian-vector products: the
    optimizer runs the closure and builds the double-backward graph on the steps that need it.
    Returns the loss before the step.

    Example:
        >>> from gradchain.optimizers import ESGD
        >>> model = nn.Embedding(VOCAB_SIZE, VOCAB_SIZE)  # a bigram model: next-byte logits
        >>> _ = nn.init.zeros_(model.weight)
        >>> batch = (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
        >>> opt = ESGD(model.parameters())                # Hessian-vector products
        >>> [round(closure_step(model, batch, opt).item(), 3) for _ in range(2)]
        [5.545, 3.073]
    """
    return optimizer.step(_training_closure(model, batch, optimizer))


def _training_closure(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer
                      ) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch)
        loss.backward()
        return loss

    return closure


def validation_step(val_batches: Iterator[Batch]) -> StepFn:
    """Steps for optimizers that learn from a validation gradient (``uses_validation``, as
    RTHO and MARTHE): :func:`closure_step`, plus ``val_closure``, the loss of the next held-out
    batch at the current parameters.

    Example:
        >>> from gradchain.optimizers import RTHO
        >>> model = nn.Embedding(VOCAB_SIZE, VOCAB_SIZE)  # a bigram model: next-byte logits
        >>> _ = nn.init.zeros_(model.weight)
        >>> batch = (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
        >>> step = validation_step(iter([batch] * 3))     # here the held-out batches are the same
        >>> opt = RTHO(model.parameters(), lr=1.0, hyper_lr=1e-3)
        >>> [round(step(model, batch, opt).item(), 3) for _ in range(3)]
        [5.545, 4.552, 2.715]
    """

    def step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> Tensor:
        val_batch = next(val_batches)
        return optimizer.step(_training_closure(model, batch, optimizer),
                              val_closure=lambda: lm_loss(model, val_batch))

    return step


def _uses_validation(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "uses_validation", False))


def _uses_curvature(optimizer: torch.optim.Optimizer) -> bool:
    needs_hvp = getattr(optimizer, "needs_hvp", None)
    return callable(needs_hvp) and bool(needs_hvp())


def _tensors(obj: Any) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state_dict()``, each storage once (the
    per-parameter ``"state"`` and anything else an optimizer saves, as a mechanized optimizer's
    ``"mechanic"`` entry).

    Example:
        >>> p = nn.Parameter(torch.zeros(10)); opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(10); opt.step(); state_bytes(opt)  # exp_avg, exp_avg_sq, step
        84
    """
    storages = {}
    for tensor in _tensors(optimizer.state_dict()):
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list[Batch], optimizer: torch.optim.Optimizer) -> float:
    """Mean loss over ``batches``, at the evaluation parameters of optimizers that keep some
    (schedule-free optimizers' ``eval()``/``train()``, as HeavyBall's and schedulefree's)."""
    was_training = model.training
    model.eval()
    swaps = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train",
                                                                            None))
    if swaps:
        optimizer.eval()
    loss = sum(lm_loss(model, batch).item() for batch in batches) / len(batches)
    if swaps:
        optimizer.train()
    model.train(was_training)
    return loss


def _as_float(loss: Tensor | float) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def _timed_opt_steps(optimizer: torch.optim.Optimizer) -> list[float]:
    """Record the seconds of every ``optimizer.step`` call (through torch's step hooks)."""
    times: list[float] = []
    started: list[float] = []
    optimizer.register_step_pre_hook(lambda *_: started.append(time.perf_counter()))
    optimizer.register_step_post_hook(lambda *_: times.append(time.perf_counter() - started.pop()))
    return times


def train(
    optimizer_factory: OptimizerFactory,
    config: TaskConfig | None = None,
    *,
    progress: Progress | None = None,
    step_fn: StepFn | None = None,
) -> TrainResult:
    """Train the task's model with the optimizer that ``optimizer_factory`` builds.

    Every call starts from the same initial weights and sees the same batches (both from
    ``config.seed``), so runs with different optimizers differ only by the optimizer.

    Args:
        optimizer_factory: called once with ``list(model.named_parameters())``; returns a
            ``torch.optim.Optimizer``.
        config: sizes and schedule; ``None`` means :meth:`TaskConfig.from_env`.
        progress: called after each step as ``progress(step, total_steps, loss)``.
        step_fn: ``step_fn(model, batch, optimizer) -> loss`` replaces the default:
            :func:`validation_step` for optimizers that learn from a validation gradient (their
            ``uses_validation`` is True: the last 10% of the training split is then held out
            for them and never trained on), :func:`closure_step` for optimizers that use
            Hessian-vector products (their ``needs_hvp()`` is True at the start),
            :func:`default_step` otherwise. Build the loss with :func:`lm_loss`.

    Example:
        >>> result = train(lambda params: torch.optim.SGD(params, lr=0.1), TaskConfig.small())
        >>> len(result.train_loss) == TaskConfig.small().steps
        True
    """
    config = config or TaskConfig.from_env()
    train_data, val_data = _splits(config.max_chars)
    generator = torch.Generator().manual_seed(config.seed)
    eval_generator = torch.Generator().manual_seed(config.seed + 1)
    val_batches = list(islice(_batches(val_data, config, eval_generator), config.eval_batches))
    train_eval = list(islice(_batches(train_data, config, eval_generator), config.eval_batches))

    model = make_model(config)
    optimizer = optimizer_factory(list(model.named_parameters()))
    if _uses_validation(optimizer):  # its validation data is held out of the training split
        n_held = max(len(train_data) // 10, config.seq_len + 1)
        train_data, held_out = train_data[:-n_held], train_data[-n_held:]
        held_batches = _batches(held_out, config, torch.Generator().manual_seed(config.seed + 2))
        step_fn = step_fn or validation_step(held_batches)
    step_fn = step_fn or (closure_step if _uses_curvature(optimizer) else default_step)
    opt_times = _timed_opt_steps(optimizer)
    result = TrainResult()
    step_times: list[float] = []
    elapsed = 0.0

    def log_validation(step: int) -> None:
        result.val_steps.append(step)
        result.val_loss.append(_evaluate(model, val_batches, optimizer))
        result.val_seconds.append(elapsed)

    log_validation(0)
    batches = _batches(train_data, config, generator)
    for step, batch in enumerate(islice(batches, config.steps), start=1):
        start = time.perf_counter()
        loss = _as_float(step_fn(model, batch, optimizer))
        step_times.append(time.perf_counter() - start)
        elapsed += step_times[-1]
        result.steps.append(step)
        result.train_loss.append(loss)
        result.seconds.append(elapsed)
        if step % config.eval_every == 0 or step == config.steps:
            log_validation(step)
        if progress is not None:
            progress(step, config.steps, loss)

    result.final_val_loss = result.val_loss[-1]
    result.final_train_loss = _evaluate(model, train_eval, optimizer)
    result.ms_per_step = 1e3 * statistics.median(step_times)
    result.ms_per_opt_step = 1e3 * statistics.median(opt_times) if opt_times else float("nan")
    result.state_bytes = state_bytes(optimizer)
    return result
