r"""Mechanic (Cutkosky, Defazio & Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023): a
learned global scale for the displacement of any base optimizer (ALGORITHMS.md §6)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    Tree,
    as_tree,
    check_choice,
    check_constant,
    check_dense_real,
    check_structure,
    find_state,
    leaves,
    state_dtype,
    writable,
    zeros_like_state,
)
from gradchain.distributed import local_shard, local_shards, norms_over_shards, sum_over_shards

__all__ = ["MechanicState", "MechanicRule", "mechanic_rule", "mechanic_scale",
           "mechanic_scale_value", "DEFAULT_BETAS"]

#: The decays of the n coin-betting learners: 1 - 10^-i, i = 1..6 (both references).
DEFAULT_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)
VARIANTS = ("optax", "pytorch")
_DEFAULT_S_INIT = {"optax": 1e-6, "pytorch": 1e-8}
_PYTORCH_INITIAL_M = 1e-6  # hard-coded in mechanic_pytorch 0.0.1


class MechanicState(NamedTuple):
    """State of ``mechanic_scale``: the reference point :math:`x_{ref}` (and Δ with
    ``store_delta``), and the n learners' scalars s, m, v, r as 1-D tensors, one entry per β;
    :math:`S = \\sum_i s_i`.

    Example:
        >>> state = mechanic_scale().init([torch.zeros(2, 3)])
        >>> state.x_ref[0].shape, state.s.shape, state.delta  # six betas by default
        (torch.Size([2, 3]), torch.Size([6]), None)
    """

    count: int
    x_ref: list[Tensor]  # the parameters at the first update: x_t = x_ref + S_t * delta_t
    delta: list[Tensor] | None  # delta_t, the un-scaled base displacement (store_delta only)
    s: Tensor  # (n,) the scale of each learner; S = sum(s)
    m: Tensor  # (n,) running maximum of |h|
    v: Tensor  # (n,) discounted sum of h^2
    r: Tensor  # (n,) reward


class MechanicRule(NamedTuple):
    """Mechanic's configuration and its steps on the scalars, shared by ``mechanic_scale`` and
    the ``torch.optim`` wrapper (``optimizers.mechanic.mechanize``), which gather the global
    sums in different orders around the base step. Build it with ``mechanic_rule``, which
    checks the options and fills in the defaults.

    Example:
        >>> rule = mechanic_rule(variant="pytorch")
        >>> state = rule.init([torch.zeros(2)])
        >>> rule.optax, rule.scale(state)  # the pytorch variant starts at s = 0
        (False, tensor(0.))
    """

    s_decay: float
    betas: tuple[float, ...]
    s_init: float
    eps: float
    store_delta: bool
    optax: bool  # the optax variant, else mechanic_pytorch's

    def init(self, params: Tree) -> MechanicState:
        x = [p.detach() for p in leaves(params)]
        dtype = _scalar_dtype(x)
        device = x[0].device if x else None
        n = len(self.betas)
        x_ref = [p.to(state_dtype(p), copy=True) for p in x]
        delta = zeros_like_state(x) if self.store_delta else None
        s = torch.full((n,), self.s_init if self.optax else 0.0, dtype=dtype, device=device)
        m = torch.full((n,), 0.0 if self.optax else _PYTORCH_INITIAL_M, dtype=dtype,
                       device=device)
        zeros = torch.zeros(n, dtype=dtype, device=device)
        return MechanicState(0, x_ref, delta, s, m, v=zeros, r=zeros.clone())

    def per_shift(self, state: MechanicState) -> Tensor | float:
        """The divisor of the shift x - x_ref that gives Δ (S + ε), or 1 for a stored Δ."""
        return 1.0 if self.store_delta else state.s.sum() + self.eps

    def hypergradient(self, state: MechanicState, g_shift: Tensor,
                      decay_terms: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        r""":math:`h = \langle g + \lambda S \frac{\|g\|}{\|x\| + \epsilon} x, \Delta
        \rangle` from the sums over the shift: ``g_shift`` = <g, shift> and, with λ > 0,
        ``decay_terms`` = (|g|, |x|, <x, shift>) (x: the variant's point)."""
        h = g_shift
        if decay_terms is not None:
            g_norm, point_norm, point_shift = decay_terms
            pull = self.s_decay * state.s.sum() * g_norm / (point_norm + self.eps)
            h = h + pull * point_shift
        return h / self.per_shift(state)

    def tune(self, state: MechanicState, h: Tensor) -> MechanicState:
        """The learners' step from h: the next state, with the same x_ref and Δ."""
        beta = torch.tensor(self.betas, dtype=state.s.dtype, device=state.s.device) \
            if torch.compiler.is_compiling() else \
            _beta_tensor(self.betas, state.s.dtype, state.s.device)  # dynamo warns of lru_cache
        tuner = _optax_tuner if self.optax else _pytorch_tuner
        s, m, v, r = tuner(h, state, beta, self.s_init / len(self.betas), self.eps)
        return MechanicState(state.count + 1, state.x_ref, state.delta, s, m, v, r)

    def scale(self, state: MechanicState) -> Tensor:
        """S = sum(s) (clamped at 0 in the pytorch variant)."""
        return state.s.sum() if self.optax else state.s.sum().clamp(min=0)

    def shift_coefficient(self, state: MechanicState, new_scale: Tensor) -> Tensor:
        r"""c in :math:`x_{t+1} - x_t = c\,\text{shift} + S_{t+1} u` (recovered Δ)."""
        return new_scale / self.per_shift(state) - 1


def mechanic_scale(s_decay: float = 0.01, betas: Sequence[float] = DEFAULT_BETAS,
                   s_init: float | None = None, eps: float = 1e-8, store_delta: bool = False,
                   variant: str = "optax") -> GradientTransformation:
    r"""Mechanic's learned scale S of the base optimizer's cumulative displacement; terminal.

    The incoming update :math:`u_t` is the base optimizer's step (it already holds
    :math:`-\eta`). Mechanic keeps the parameters at :math:`x_t = x_{ref} + S_t\,\Delta_t`,
    :math:`\Delta_t = \sum_{i<t} u_i`, and learns :math:`S = \sum_i s_i` online, one
    coin-betting learner per decay :math:`\beta_i`. With the raw gradient g (the ``grads``
    extra), λ = ``s_decay`` and t = count + 1:

    .. math::
        \hat g = g + \lambda S \frac{\|g\|}{\|x\| + \epsilon}\, x, \qquad
        h = \langle \hat g, \Delta_t \rangle, \qquad
        \Delta_t = \frac{x_t - x_{ref}}{S + \epsilon} \text{ (or stored)}

    .. math::
        m_i \leftarrow \max(\beta_i m_i, |h| + \epsilon), \quad
        v_i \leftarrow \beta_i^2 v_i + h^2, \quad
        r_i \leftarrow \beta_i r_i - s_i\,\mathrm{clip}(h, \pm m_i^{old})

    .. math::
        s_i \leftarrow \frac{(s_{init}/n)\, m_i + \max(r_i, 0)}{\sqrt{v_i} + \epsilon}, \qquad
        o_t = x_{ref} + S_{t+1}\,(\Delta_t + u_t) - x_t

    Norms and inner products are global over all parameters. When S changes, all the past
    displacement is rescaled: :math:`o_t = (S_{t+1} - S_t)\Delta_t + S_{t+1} u_t`.

    ``variant="optax"`` (default) is ``optax.contrib.mechanize`` (the paper's experiments):
    :math:`s_i = s_{init}`, :math:`m_i = 0` initially, and the first output is exactly
    :math:`s_{init} u_1`. ``variant="pytorch"`` is ``mechanic_pytorch.mechanize`` 0.0.1:
    :math:`s_i = 0` and :math:`m_i = 10^{-6}` initially, no ε in m's update, no clipping of
    h, :math:`r_i \leftarrow \max(\beta_i r_i - s_i h, 0)`, and the λ-term uses
    :math:`x^+ = x_t + u_t` for x; its first scale is
    :math:`10^{-6}\,\bar\beta\, s_{init}/\epsilon` (9.8e-7 with the defaults). optax keeps r
    unclipped and clips it only in the wealth (ALGORITHMS.md §6.4 writes max(0, ·) into r,
    which differs once r < 0), so in that variant r may be negative; s never is.

    Defaults: ``s_decay`` (λ) 0.01; ``betas`` 1 - 10^-i for i = 1..6; ``s_init`` (a small
    underestimate of the scale, > 0) None = the variant's (optax 1e-6, pytorch 1e-8); ``eps``
    1e-8 (> 0: the first step divides by it). ``store_delta=True`` keeps Δ instead of recovering
    it as :math:`(x_t - x_{ref})/(S + \epsilon)`, at the cost of a second parameter-sized
    buffer. The recovered Δ is shrunk by S/(S + ε) while S ~ ε, absorbs changes made to the
    parameters outside the optimizer, and misses the steps the parameters cannot represent:
    when the first steps :math:`s_{init}\,|u|` are below the parameters' resolution (about
    1e-7·|x| in float32, 4e-3·|x| in bfloat16), x stays at x_ref, Δ at 0, and S never grows.
    Use ``store_delta=True`` (or a larger base learning rate) there.

    The base chain should end with ``scale_by_learning_rate`` (η = 1 is a good default; a
    schedule's shape is kept, its scale learned). Needs ``params`` and the ``grads`` extra (the
    raw gradient, which ``chain`` adds); every parameter given must have its gradient
    (``mechanic_pytorch`` leaves parameters without one out of every sum; here, leave them out of
    the tree, as ``ChainOptimizer`` does).

    State (``MechanicState``): ``count``; ``x_ref`` (one tensor per parameter, a copy of the
    parameters at ``init``, taken again at the first ``update`` so that weights loaded in
    between are honoured; float32 for 16-bit parameters); ``delta`` (the same, with
    ``store_delta``, else None); ``s``, ``m``, ``v``, ``r`` (1-D, one entry per β, float64 if a
    parameter is float64, else float32). Sums are accumulated in that dtype; the output is in
    x_ref's dtype, for ``apply_updates`` to round once.

    Example:
        >>> from gradchain import chain
        >>> from gradchain.transforms import scale_by_learning_rate
        >>> tx = chain(scale_by_learning_rate(1.0), mechanic_scale())
        >>> params = [torch.zeros(2)]
        >>> updates, state = tx.update([torch.ones(2)], tx.init(params), params)
        >>> updates  # the first step is s_init * u_1
        [tensor([-1.0000e-06, -1.0000e-06])]
        >>> round(mechanic_scale_value(state), 9)
        1e-06
    """
    rule = mechanic_rule(s_decay, betas, s_init, eps, store_delta, variant)
    store_delta, s_decay = rule.store_delta, rule.s_decay

    def update(updates: Tree, state: MechanicState, params: Tree | None = None,
               **extras: Any) -> tuple[Tree, MechanicState]:
        x, g = _inputs(updates, params, extras)
        u = [t.detach() for t in leaves(updates)]
        if not u:
            return updates, state._replace(count=state.count + 1)
        if state.count == 0:
            torch._foreach_copy_(local_shards(state.x_ref), local_shards(x, state.x_ref))
        # Delta_t = shift / per_shift: stored, or recovered from shift = x_t - x_ref = (S + eps)
        # Delta_t with its divisor folded into the scalars
        shift = state.delta if store_delta else torch._foreach_sub(x, state.x_ref)
        point = x if rule.optax or not s_decay else torch._foreach_add(x, u)
        decay_terms = (_norm(g, state.s), _norm(point, state.s),
                       _inner(point, shift, state.s)) if s_decay else None
        new = rule.tune(state, rule.hypergradient(state, _inner(g, shift, state.s), decay_terms))
        new_scale = rule.scale(new)
        if store_delta:  # x_{t+1} - x_t = S_{t+1} Delta_{t+1} + x_ref - x_t
            torch._foreach_add_(state.delta, u)
            # S in each Delta's dtype: a 0-d Delta times a wider 0-d S would take S's dtype
            out = torch._foreach_mul(state.delta, [new_scale.to(d.dtype) for d in state.delta])
            torch._foreach_add_(out, state.x_ref)
            torch._foreach_sub_(out, x)
        else:  # x_{t+1} - x_t = S_{t+1} (shift / per_shift + u) - shift
            out = shift
            torch._foreach_mul_(out, rule.shift_coefficient(state, new_scale))
            # writable sees the updates themselves: a detached view of the raw gradient would
            # escape its identity check and be scaled in place
            step = [t.detach() for t in writable(leaves(updates), extras)]
            torch._foreach_mul_(step, new_scale)
            torch._foreach_add_(out, step)
        return as_tree(updates, out), new

    return GradientTransformation(rule.init, update, terminal=True)


def mechanic_rule(s_decay: float = 0.01, betas: Sequence[float] = DEFAULT_BETAS,
                  s_init: float | None = None, eps: float = 1e-8, store_delta: bool = False,
                  variant: str = "optax") -> MechanicRule:
    """The checked ``MechanicRule`` of ``mechanic_scale``'s options (see there for the math); a
    ``ValueError`` names any option out of range.

    Defaults as ``mechanic_scale``: s_decay 0.01, betas ``DEFAULT_BETAS`` (1 - 10^-i,
    i = 1..6), s_init None = the variant's (optax 1e-6, pytorch 1e-8), eps 1e-8,
    store_delta False, variant "optax".

    Example:
        >>> mechanic_rule().s_init, mechanic_rule(variant="pytorch").s_init
        (1e-06, 1e-08)
        >>> mechanic_rule(betas=(0.9, 1.0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: every entry of betas must be a number in (0, 1) (open interval), got 1.0 ...
    """
    check_constant("mechanic_scale", s_decay=s_decay, s_init=s_init, eps=eps)
    check_choice("variant", variant, VARIANTS)
    betas = _checked_betas(betas)
    s_init = _DEFAULT_S_INIT[variant] if s_init is None else s_init
    _check_options(s_decay, s_init, eps, store_delta)
    return MechanicRule(float(s_decay), betas, float(s_init), float(eps), store_delta,
                        variant == "optax")


def mechanic_scale_value(state: Any) -> float:
    """The current scale :math:`S = \\sum_i s_i` of a ``mechanic_scale`` state, or of the one
    inside a chain's (or any combinator's) state, for logging.

    Example:
        >>> tx = mechanic_scale()
        >>> params = [torch.zeros(3)]
        >>> _, state = tx.update([torch.ones(3)], tx.init(params), params, grads=[torch.ones(3)])
        >>> f"{mechanic_scale_value(state):.1e}"
        '1.0e-06'
    """
    return float(find_state(state, MechanicState, "mechanic_scale").s.sum())


# ----------------------------------------------------------------------------------------------
# The two tuners: the learners' step on the n-vectors, from the previous state and h


def _optax_tuner(h: Tensor, state: MechanicState, beta: Tensor, base_wealth: float,
                 eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h_clipped = torch.minimum(torch.maximum(h, -state.m), state.m)
    m = torch.maximum(beta * state.m, h.abs() + eps)
    v = beta.square() * state.v + h.square()
    r = beta * state.r - state.s * h_clipped  # stored unclipped, as optax does
    wealth = base_wealth * m + r.clamp(min=0)
    return wealth / (v.sqrt() + eps), m, v, r


def _pytorch_tuner(h: Tensor, state: MechanicState, beta: Tensor, base_wealth: float,
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m = torch.maximum(beta * state.m, h.abs())
    v = beta.square() * state.v + h.square()
    r = (beta * state.r - state.s * h).clamp(min=0)
    wealth = base_wealth * m + r
    return wealth / (v.sqrt() + eps), m, v, r


# ----------------------------------------------------------------------------------------------
# Pieces


def _inputs(updates: Tree, params: Tree | None, extras: Mapping[str, Any]
            ) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters and the raw gradient, checked, detached."""
    if params is None:
        raise ValueError("mechanic_scale needs the parameters: call update(updates, state, "
                         "params) (ChainOptimizer and optimizers.mechanic.mechanize pass them)")
    grads = extras.get("grads")
    if grads is None:
        raise ValueError("mechanic_scale needs the raw gradient as the 'grads' extra: use it "
                         "inside a chain (chain adds it) or call update(updates, state, params, "
                         "grads=gradient)")
    check_structure(grads, params, "grads")
    g = [t.detach() for t in leaves(grads)]
    check_dense_real(leaves(updates) + g, "mechanic_scale")
    return [p.detach() for p in leaves(params)], g


def _inner(a: list[Tensor], b: list[Tensor], like: Tensor) -> Tensor:
    """:math:`\\sum_{leaves} \\langle a, b \\rangle` accumulated in ``like``'s dtype, on its
    device (a 0-d tensor: no host synchronisation; DTensors: one collective)."""
    dots = [torch.dot(local_shard(x).reshape(-1).to(like.dtype),
                      local_shard(y, x).reshape(-1).to(like.dtype)).to(like.device)
            for x, y in zip(a, b)]
    return torch.stack(sum_over_shards(dots, a)).sum()


def _norm(a: list[Tensor], like: Tensor) -> Tensor:
    """The global 2-norm of ``a``, accumulated in ``like``'s dtype, on its device."""
    norms = norms_over_shards(torch._foreach_norm(local_shards(a), 2, dtype=like.dtype), a)
    return torch.linalg.vector_norm(torch.stack([n.to(like.device) for n in norms]))


@functools.lru_cache(maxsize=None)
def _beta_tensor(betas: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The decays as a tensor, made once per (betas, dtype, device), not on every step."""
    return torch.tensor(betas, dtype=dtype, device=device)


def _scalar_dtype(params: list[Tensor]) -> torch.dtype:
    """float64 if any parameter is float64, else float32 (never 16-bit)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _checked_betas(betas: Sequence[float]) -> tuple[float, ...]:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence):
        raise ValueError(f"betas must be a sequence of decays in (0, 1), got {betas!r}")
    if not betas:
        raise ValueError("betas is empty: give at least one decay in (0, 1), e.g. the default "
                         f"{DEFAULT_BETAS}")
    for beta in betas:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:
            raise ValueError(f"every entry of betas must be a number in (0, 1) (open interval), "
                             f"got {beta!r} in {tuple(betas)}")
    return tuple(float(beta) for beta in betas)


def _check_options(s_decay: float, s_init: float, eps: float, store_delta: bool) -> None:
    for name, value in (("s_decay", s_decay), ("s_init", s_init), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{name} must be a number, got {value!r}")
    if not s_decay >= 0:
        raise ValueError(f"s_decay must be >= 0 (0 turns Mechanic's weight decay off), "
                         f"got {s_decay}")
    if not s_init > 0:
        raise ValueError(f"s_init must be > 0, got {s_init}: with 0 the scale never leaves 0; "
                         "use a small underestimate of the scale, e.g. 1e-8")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}: the first step divides by it; "
                         "use e.g. 1e-8")
    if not isinstance(store_delta, bool):
        raise ValueError(f"store_delta must be True or False, got {store_delta!r}")
