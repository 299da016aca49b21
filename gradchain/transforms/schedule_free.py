"""Schedule-free averaging (Defazio et al., 2024) as a wrapper around a base optimizer, and the
helpers that switch the parameters between the training point y and the average x."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    Hyper,
    Tree,
    as_tree,
    check_choice,
    check_constant,
    check_decay,
    check_dense_real,
    check_non_negative,
    find_state,
    hoist,
    leaves,
    lerp_,
    resolve,
    state_dtype,
    writable,
)
from gradchain.distributed import local_shards

__all__ = [
    "ScheduleFreeState",
    "schedule_free",
    "schedule_free_eval_params",
    "to_eval",
    "to_train",
]

_WEIGHTINGS = ("current", "max")


class ScheduleFreeState(NamedTuple):
    """State of ``schedule_free``: the weight sum :math:`\\sum_{i \\le t} w_i` and the running
    maximum learning rate (float64 0-d), the base iterate z (a copy of the parameters at first,
    float32 for 16-bit ones) and the base transform's state.

    Example:
        >>> from gradchain.transforms import scale_by_learning_rate
        >>> state = schedule_free(scale_by_learning_rate(1.0), 1.0).init([torch.ones(2, 3)])
        >>> state.z[0].shape, float(state.weight_sum), state.base
        (torch.Size([2, 3]), 0.0, EmptyState())
    """

    count: int
    weight_sum: Tensor  # sum of the averaging weights w_1 .. w_t (0-d, float64)
    lr_max: Tensor  # running max of learning_rate(count) (0-d, float64)
    z: list[Tensor]  # the base optimizer's iterate, one per parameter
    base: Any


def schedule_free(base: GradientTransformation, learning_rate: Hyper, b1: float = 0.9,
                  weight_lr_power: float = 2.0, r: float = 0.0, weighting: str = "current"
                  ) -> GradientTransformation:
    r"""Schedule-free averaging around ``base`` (Defazio et al., "The Road Less Scheduled",
    2024); terminal.

    Three sequences: z, the iterate of the base optimizer; x, a weighted average of the z's
    (the point to evaluate); y, where gradients are taken, held by the parameters in training:

    .. math::
        y_t = (1-\beta)\, z_t + \beta\, x_t, \qquad
        z_{t+1} = z_t + b_t, \qquad
        x_{t+1} = (1 - c_{t+1})\, x_t + c_{t+1}\, z_{t+1},

    where :math:`b_t` is the output of ``base`` at y (it already contains :math:`-\gamma_t`
    and any weight decay, which is thus evaluated at y) and

    .. math::
        c_{t+1} = \frac{w_t}{\sum_{i \le t} w_i}, \qquad
        w_t = t^{\,r}\, \tilde\gamma_t^{\,p}

    (c = 0 while the sum is 0), t = count + 1, p = ``weight_lr_power``. x is eliminated
    (no division by β): the output is the displacement of y,

    .. math::
        o_t = y_{t+1} - y_t = c_{t+1}\,(z_t - y_t) + \big(1 - \beta\,(1 - c_{t+1})\big)\, b_t,

    and then :math:`z \leftarrow z + b_t`. With a constant learning rate and p = 2,
    :math:`c_{t+1} = 1/t` and :math:`x_{T+1}` is the plain mean of :math:`z_2, \dots, z_{T+1}`.
    ``schedule_free_eval_params``, ``to_eval`` and ``to_train`` recover x from y and z.

    ``base`` is a non-terminal transform (e.g. ``chain(scale_by_rms_inplace(b2, eps),
    add_decayed_weights(wd), scale_by_learning_rate(lr))``) without momentum: β replaces it.
    ``learning_rate`` must be the same number or schedule that ``base`` uses; the weights read
    it at ``count``, the index ``scale_by_learning_rate`` uses. :math:`\tilde\gamma_t` by
    ``weighting``:

    - ``"current"`` (default, HeavyBall): :math:`\tilde\gamma_t = \gamma_t`; HeavyBall uses
      p = 2 and ignores r.
    - ``"max"`` (optax): :math:`\tilde\gamma_t = \max_{i \le t} \gamma_i`. Equal to
      ``"current"`` under a non-decreasing (warm-up) learning rate; optax reads the schedule at
      count + 1 for the weights and count for the step, this wrapper at count for both.
    - The official reference is ``"max"`` with r (default 0 there too) and a learning rate
      that folds in Adam's second-moment bias correction,
      :math:`\gamma_t = \text{lr}\cdot\min(t/W, 1)\sqrt{1-\beta_2^t}`, so early weights are
      much smaller.

    Defaults: b1 (β) = 0.9, in [0, 1) (0.95 and 0.98 are also reasonable); weight_lr_power
    = 2; r = 0. Needs ``params`` (they hold y; ``base`` receives them too).

    State: ``count``, ``weight_sum`` and ``lr_max`` (0-d float64 tensors on the parameters'
    device, so that a compiled step neither synchronises nor specialises on them), ``z`` (one
    tensor per parameter, a copy of the parameters at ``init``, float32 for 16-bit parameters) and
    ``base``. y- and z-updates are computed from the same values in z's dtype and z is written
    once, so z moves with bfloat16 parameters (HeavyBall 0.8's stale copy froze it); the output
    is in z's dtype, for ``apply_updates`` to round once.

    Example:
        >>> from gradchain import chain, apply_updates
        >>> from gradchain.transforms import scale_by_learning_rate, scale_by_sign
        >>> tx = schedule_free(chain(scale_by_sign(), scale_by_learning_rate(0.1)), 0.1)
        >>> params = [torch.ones(2)]
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     updates, state = tx.update([torch.ones(2)], state, params)
        ...     params = apply_updates(params, updates)
        >>> params, state.z  # y and z
        ([tensor([0.7900, 0.7900])], [tensor([0.7000, 0.7000])])
        >>> schedule_free_eval_params(state, params, b1=0.9)  # x = mean(0.9, 0.8, 0.7)
        [tensor([0.8000, 0.8000])]
    """
    if base.terminal:
        raise ValueError("the base of schedule_free must not be terminal: give it the base "
                         "optimizer's step, ending with scale_by_learning_rate")
    check_constant("schedule_free", b1=b1, weight_lr_power=weight_lr_power, r=r)
    check_decay("b1", b1)
    check_non_negative("weight_lr_power", weight_lr_power)
    check_non_negative("r", r)
    check_non_negative("learning_rate", learning_rate)
    check_choice("weighting", weighting, _WEIGHTINGS)

    def init(params: Tree) -> ScheduleFreeState:
        p = leaves(params)
        z = [x.detach().to(dtype=state_dtype(x), copy=True) for x in p]
        zero = torch.zeros((), dtype=torch.float64, device=p[0].device if p else None)
        return ScheduleFreeState(count=0, weight_sum=zero, lr_max=zero.clone(), z=z,
                                 base=base.init(params))

    memo: list[tuple[tuple[Any, ...], tuple[Tensor, Tensor, Any]]] = []

    def averaging(state: ScheduleFreeState, rate: Any) -> tuple[Tensor, Tensor, Any]:
        """The new weight sum and lr max and :math:`c_{t+1}`. Every piece of one optimizer step
        starts from the same state, so an eager step computes them once (kept with the state's
        own scalar tensors as the key), and on CPU reads c as a number (elsewhere that would
        synchronise the device); a compiled step keeps c a tensor."""
        key = (state.count, state.weight_sum, state.lr_max, rate)
        eager = not torch.compiler.is_compiling() and not isinstance(rate, Tensor)
        if eager and memo and _same_key(memo[0][0], key):
            return memo[0][1]
        lr = torch.as_tensor(rate, dtype=torch.float64, device=state.weight_sum.device)
        lr_max = torch.maximum(state.lr_max, lr)
        weight = float(state.count + 1) ** r * \
            (lr if weighting == "current" else lr_max) ** weight_lr_power
        weight_sum = state.weight_sum + weight
        c = torch.where(weight_sum > 0, weight / weight_sum, 0.0)
        on_cpu = eager and c.device.type == "cpu"
        result = (weight_sum, lr_max, c.item() if on_cpu else c)
        if eager:
            memo[:] = [(key, result)]
        return result

    def unscaled(updates: Tree, state: ScheduleFreeState, params: Tree | None = None,
                 **extras: Any):
        if params is None:
            raise ValueError("schedule_free needs the parameters (they hold y): "
                             "call update(updates, state, params)")
        check_dense_real(leaves(updates), "schedule_free")
        rate = resolve(learning_rate, state.count)
        if not isinstance(rate, Tensor) and not rate >= 0:
            raise ValueError(f"schedule_free: learning_rate at count {state.count} is {rate}; "
                             "it must be >= 0")
        weight_sum, lr_max, c = averaging(state, rate)
        b_tree, base_state = base.update(updates, state.base, params, **extras)
        new_state = ScheduleFreeState(state.count + 1, weight_sum, lr_max, state.z, base_state)
        keep = 1.0 - b1 * (1.0 - c)  # >= 1 - b1 > 0
        b, z = leaves(b_tree), state.z
        if b:
            # z <- z + b, then o / keep = b + (c / keep)(z_old - y) = lerp(b, z - y, c / keep),
            # in z's dtype (y is upcast exactly); the caller scales by keep
            out = writable(b, extras)
            torch._foreach_add_(z, b)
            lerp_(out, torch._foreach_sub(z, leaves(params)), c / keep)
            b_tree = as_tree(updates, out)
        return b_tree, new_state, hoist(keep), 0.0

    def update(updates: Tree, state: ScheduleFreeState, params: Tree | None = None,
               **extras: Any):
        out, state, keep, _ = unscaled(updates, state, params, **extras)
        if leaves(out):
            torch._foreach_mul_(leaves(out), keep)
        return out, state

    return GradientTransformation(init, update, terminal=True, leafwise=base.leafwise,
                                  elementwise=base.elementwise, unscaled=unscaled)


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """The same ``(count, weight_sum, lr_max, rate)``: the same scalar tensors, not equal ones."""
    return a[0] == b[0] and a[1] is b[1] and a[2] is b[2] and a[3] == b[3]


# ----------------------------------------------------------------------------------------------
# Evaluation point


def _towards_z(state: Any, params: Tree, weight: float) -> tuple[list[Tensor], list[int],
                                                                   list[Tensor]]:
    """``lerp(params, z, weight)`` in z's dtype for the parameters that have a z; returns the
    parameters, their positions, and the results."""
    p = leaves(params)
    z = find_state(state, ScheduleFreeState, "schedule_free").z
    if len(z) != len(p):
        raise ValueError(f"the schedule_free state holds z for {len(z)} parameters, "
                         f"params has {len(p)}")
    index = [i for i, zi in enumerate(z) if zi is not None]  # None: not under the wrapper
    if not index:
        return p, index, []
    moved = torch._foreach_lerp([p[i].detach().to(z[i].dtype) for i in index],
                                [z[i] for i in index], weight)
    return p, index, moved


def _eval_b1(b1: float) -> float:
    check_constant("schedule_free", b1=b1)
    check_decay("b1", b1)
    if b1 == 0:
        raise ValueError("b1 = 0: the parameters y equal z and the average x cannot be "
                         "recovered from them; keep x yourself or use b1 > 0")
    return float(b1)


@torch.no_grad()
def schedule_free_eval_params(state: Any, params: Tree, b1: float) -> Tree:
    r"""The averaged parameters x (new tensors) from the training parameters y and the state.

    .. math::  x = \frac{y - (1-\beta)\, z}{\beta} = y + (1 - 1/\beta)\,(z - y)

    ``b1`` (β) must be the wrapper's; it is configuration, not state. β = 0 makes y = z, so x
    is undefined: ``ValueError``. ``state`` is the wrapper's state or a state that contains
    exactly one (a chain's); parameters outside the wrapper (a ``partition``) come back as
    copies. Computed in z's dtype, returned in each parameter's dtype.

    Example:
        >>> from gradchain.transforms import scale_by_learning_rate
        >>> tx = schedule_free(scale_by_learning_rate(1.0), 1.0, b1=0.5)
        >>> params = [torch.zeros(1)]
        >>> _, state = tx.update([torch.ones(1)], tx.init(params), params)
        >>> schedule_free_eval_params(state, params, b1=0.5)  # y = 0, z = -1
        [tensor([1.])]
    """
    beta = _eval_b1(b1)
    p, index, moved = _towards_z(state, params, 1.0 - 1.0 / beta)
    x = [t.detach().clone() for t in p]
    for i, value in zip(index, moved):
        x[i] = value.to(p[i].dtype)
    return as_tree(params, x)


@torch.no_grad()
def to_eval(state: Any, params: Tree, b1: float) -> None:
    r"""Move the parameters in place from y to the average x, for evaluation (HeavyBall's
    ``eval()``); ``to_train`` moves them back.

    .. math::  x = y + (1 - 1/\beta)\,(z - y)

    Computed in z's dtype and written once (rounded to nearest for 16-bit parameters). Calls
    must alternate with ``to_train``: nothing records the mode. Same ``state`` and ``b1`` rules
    as ``schedule_free_eval_params``.

    Example:
        >>> from gradchain.transforms import scale_by_learning_rate
        >>> tx = schedule_free(scale_by_learning_rate(1.0), 1.0, b1=0.5)
        >>> params = [torch.zeros(1)]
        >>> _, state = tx.update([torch.ones(1)], tx.init(params), params)
        >>> to_eval(state, params, b1=0.5); params
        [tensor([1.])]
        >>> to_train(state, params, b1=0.5); params
        [tensor([0.])]
    """
    beta = _eval_b1(b1)
    p, index, moved = _towards_z(state, params, 1.0 - 1.0 / beta)
    if index:
        torch._foreach_copy_(local_shards([p[i] for i in index]), local_shards(moved))


@torch.no_grad()
def to_train(state: Any, params: Tree, b1: float) -> None:
    r"""Move the parameters in place from the average x back to y, for training (HeavyBall's
    ``train()``); the inverse of ``to_eval``.

    .. math::  y = \beta\, x + (1 - \beta)\, z

    Computed in z's dtype and written once. Same ``state`` and ``b1`` rules as
    ``schedule_free_eval_params``; see ``to_eval`` for the round trip.

    Example:
        >>> from gradchain.transforms import scale_by_learning_rate
        >>> tx = schedule_free(scale_by_learning_rate(1.0), 1.0, b1=0.5)
        >>> state = tx.init([torch.zeros(1)])        # z = 0
        >>> params = [torch.full((1,), 2.0)]          # the average x, as to_eval leaves it
        >>> to_train(state, params, b1=0.5); params   # y = 0.5 x + 0.5 z
        [tensor([1.])]
    """
    beta = _eval_b1(b1)
    p, index, moved = _towards_z(state, params, 1.0 - beta)
    if index:
        torch._foreach_copy_(local_shards([p[i] for i in index]), local_shards(moved))
