"""``mechanize``: any ``torch.optim.Optimizer`` class under Mechanic's learned scale
(ALGORITHMS.md §6, §8.3), as ``mechanic_pytorch.mechanize`` offers it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    check_dense_real,
    flatten_state,
    merge_state,
    select_state,
    state_dtype,
    unflatten_state,
)
from gradchain.optimizers.adapter import _backward_with_graph
from gradchain.transforms.mechanic import (
    DEFAULT_BETAS,
    MechanicState,
    mechanic_scale,
    mechanic_scale_value,
)

__all__ = ["mechanize", "Mechanized"]


class Mechanized:
    """The mixin of every class that ``mechanize`` returns (``isinstance(opt, Mechanized)``
    says whether an optimizer is mechanized). It expects a ``torch.optim.Optimizer`` after it
    in the method resolution order and a class attribute ``_mechanic``, the
    ``mechanic_scale`` transform."""

    _mechanic: GradientTransformation
    _mechanic_state: MechanicState | None = None  # over all parameters, in param-group order

    @property
    def scale(self) -> float | None:
        """The learned scale :math:`S = \\sum_i s_i` (None before the first step)."""
        state = self._mechanic_state
        return None if state is None else mechanic_scale_value(state)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """The base optimizer's step, then Mechanic's rescaling of the displacement.

        With a closure, it runs once here (under ``torch.enable_grad``, with the
        double-backward graph when the base's ``needs_hvp()`` says so); the base receives a
        closure that returns that loss on its first call and evaluates again afterwards.
        Other keyword arguments go to the base step. Returns what the base step returns.
        """
        loss_closure = None if closure is None else self._evaluated_once(closure)
        params = self._all_params()
        with torch.no_grad():
            state = self._state_over(params)
            active = [i for i, p in enumerate(params) if p.grad is not None]
            x_before = [params[i].detach().clone() for i in active]
            grads = [params[i].grad.detach().to(state_dtype(params[i]), copy=True)
                     for i in active]
            check_dense_real(grads, "mechanize")  # before anything moves
        result = self._base_step()(loss_closure, **kwargs)
        if not active:
            return result
        with torch.no_grad():
            x_after = [params[i] for i in active]
            u = torch._foreach_sub([_widened(x) for x in x_after],
                                   [_widened(x) for x in x_before])
            out, part = self._mechanic.update(u, select_state(state, active), x_before,
                                              grads=grads)
            self._mechanic_state = merge_state(state, part, active)
            torch._foreach_add_(x_before, out)  # x_{t+1}, rounded once to the parameter dtype
            torch._foreach_copy_(x_after, x_before)
        return result

    def state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict()`` plus ``"mechanic"`` (from the first step on):
        ``{"state": {id: {"x_ref": tensor}}, "count": int, "s": tensor, "m": ..., "v": ...,
        "r": ..., "delta": None}`` with torch's parameter ids; with ``store_delta`` every
        ``"state"`` entry also holds ``"delta"`` (and there is no top-level ``"delta"``)."""
        state_dict = super().state_dict()  # type: ignore[misc]
        state = self._mechanic_state
        if state is not None:
            per_param, shared = flatten_state(state, len(state.x_ref))
            state_dict["mechanic"] = {"state": dict(enumerate(per_param)), **shared}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; continuing gives the same trajectory as never stopping."""
        state_dict = dict(state_dict)
        packed = state_dict.pop("mechanic", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if packed is None:
            self._mechanic_state = None
            return
        params = self._all_params()
        shared = {key: value for key, value in packed.items() if key != "state"}
        per_param = [packed["state"].get(i, {}) for i in range(len(params))]
        self._mechanic_state = unflatten_state(self._mechanic.init(params), per_param, shared)

    # ------------------------------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]  # type: ignore

    def _state_over(self, params: list[Tensor]) -> MechanicState:
        """The state, created at the first step and grown for parameters added since (their
        x_ref is their value now, before the base step moves them)."""
        state = self._mechanic_state
        if state is None:
            return self._mechanic.init(params)
        known = len(state.x_ref)
        if known == len(params):
            return state
        added = self._mechanic.init(params[known:])
        return MechanicState(*(old + new if isinstance(old, list) else old
                               for old, new in zip(state, added)))

    def _evaluated_once(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """Run ``closure`` now; return one that replays its loss once, then re-evaluates."""
        needs_hvp = getattr(self, "needs_hvp", None)
        curvature = callable(needs_hvp) and bool(needs_hvp())
        with torch.enable_grad(), _backward_with_graph(curvature):
            loss = closure()
        calls = 0

        def replay() -> Any:
            nonlocal calls
            calls += 1
            return loss if calls == 1 else closure()

        return replay

    def _base_step(self) -> Callable[..., Any]:
        """The base class's step, without torch's step hooks (they run once, around ours)."""
        step = super().step  # type: ignore[misc]
        if getattr(step, "hooked", False):
            return functools.partial(step.__wrapped__, self)
        return step


def mechanize(optimizer_class: type[torch.optim.Optimizer], *, s_decay: float = 0.01,
              betas: Sequence[float] = DEFAULT_BETAS, s_init: float | None = None,
              eps: float = 1e-8, store_delta: bool = False, variant: str = "optax") -> type:
    r"""A subclass of ``optimizer_class`` whose steps Mechanic rescales by a learned S.

    Any ``torch.optim.Optimizer`` works (``torch.optim.SGD``, ``torch.optim.AdamW``,
    ``gradchain.optimizers.SOAP``, ...): each step runs the base step, observes its
    displacement :math:`u = x_{after} - x_{before}` and sets the parameters to
    :math:`x_{ref} + S\,(\Delta + u)` with ``mechanic_scale`` (see there for the math and the
    options; ``variant="pytorch"`` with ``s_init=None`` reproduces
    ``mechanic_pytorch.mechanize``). Construct it with the base's arguments; its ``lr`` is the
    base step that Mechanic scales (1.0 is a good choice; excessively small values cost
    precision, as the effective step is S·lr). With bfloat16 parameters use
    ``store_delta=True``: the first steps, ~s_init·lr, are below their resolution, and
    without a stored Δ Mechanic would not see them (see ``mechanic_scale``).

    One scale S for all parameter groups (the paper's and ``mechanic_pytorch``'s choice);
    parameters without a gradient are left out of a step. ``add_param_group``, ``zero_grad``,
    LR schedulers (they act on the base's ``group["lr"]``), closures (run once; the base gets a
    closure that replays that loss first), Hessian-vector products of gradchain optimizers
    (``needs_hvp()``), step hooks and ``state_dict``/``load_state_dict`` (the base's plus a
    ``"mechanic"`` entry, loadable with ``torch.load(weights_only=True)``) work. ``scale``
    is the current S, for logging.

    Memory: one parameter-sized buffer persists beyond the base's state, x_ref (two with
    ``store_delta=True``). During a step, the parameters that have gradients are copied three
    times (the parameters before the base step, the gradients, which the base may change in
    place, and the displacement u; 16-bit ones are also widened to float32), and Mechanic's
    update makes one more (its output) or, for the pytorch variant with ``s_decay > 0``, two
    (x + u), all released after the step.

    The class is named ``"Mechanized" + optimizer_class.__name__`` and is also an instance of
    ``Mechanized``.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = mechanize(torch.optim.SGD)(model.parameters(), lr=1.0)
        >>> model(torch.randn(8, 4)).square().mean().backward(); _ = opt.step()
        >>> type(opt).__name__, isinstance(opt, torch.optim.SGD), f"{opt.scale:.0e}"
        ('MechanizedSGD', True, '1e-06')
    """
    if not (isinstance(optimizer_class, type) and
            issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"mechanize takes a torch.optim.Optimizer class, got {optimizer_class!r}"
                        "; for a transform or a recipe use gradchain.chains.mechanic.mechanize")
    if issubclass(optimizer_class, Mechanized):
        raise ValueError(f"{optimizer_class.__name__} is already mechanized: Mechanic must "
                         "wrap a base optimizer, not another Mechanic")
    tuner = mechanic_scale(s_decay=s_decay, betas=betas, s_init=s_init, eps=eps,
                           store_delta=store_delta, variant=variant)
    name = f"Mechanized{optimizer_class.__name__}"
    doc = (f"``{optimizer_class.__name__}`` under Mechanic's learned scale "
           f"(``gradchain.optimizers.mechanic.mechanize``, variant {variant!r}).")
    return type(name, (Mechanized, optimizer_class),
                {"_mechanic": tuner, "__doc__": doc, "__module__": __name__,
                 "__qualname__": name})


def _widened(tensor: Tensor) -> Tensor:
    """``tensor`` in its state dtype (float32 for 16-bit parameters)."""
    return tensor.to(state_dtype(tensor))
