r"""SM3: Adagrad-like per-coordinate step sizes with sub-linear memory (ALGORITHMS.md §1).

SM3-II of Anil, Gupta, Koren & Singer, "Memory-Efficient Adaptive Optimization" (NeurIPS 2019),
with the co-dimension-1 cover: a leaf of shape :math:`(n_0, \dots, n_{r-1})` keeps one
accumulator vector :math:`\mu^a` of length :math:`n_a` per axis, :math:`\sum_a n_a` numbers in
all, instead of Adagrad's :math:`\prod_a n_a`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    GradientTransformation,
    Tree,
    add_scaled_,
    as_tree,
    check_choice,
    check_decay,
    check_non_negative,
    leaves,
    state_dtype,
    zeros_like_state,
)
from gradchain.distributed import check_whole

__all__ = ["SM3State", "scale_by_sm3"]

#: On CPU in eager mode a leaf is processed in blocks of rows (slices of its first axis) of
#: about this many elements: each block's nu is computed in the output's rows (or, where the
#: transform adds its updates to the parameters itself, in one scratch block), reduced and
#: turned into the output in place while it is still in cache. The result does not depend on
#: the block size (the reductions are maxima, which are exact).
BLOCK_ELEMENTS = 1 << 20

#: Leaves of at least this many elements plan their blocks from the accumulators (``_plan``);
#: smaller vectors (rank <= 1) are updated together with foreach ops (``_Rule.vectors``).
PLAN_ELEMENTS = 1 << 14

_RULES = ("assign", "running_max")


class SM3State(NamedTuple):
    """``mu``: per parameter, a tuple of its accumulators (the cover): for rank >= 2 one per
    axis ``a``, of broadcast shape ``(1, .., n_a, .., 1)``; for rank 0 and 1 a single one of the
    parameter's shape (diagonal Adagrad). ``momentum``: per parameter, the EMA of the outputs,
    or ``None`` when ``b1 == 0`` (no buffer is allocated).

    Example:
        >>> state = scale_by_sm3().init([torch.zeros(2, 3), torch.zeros(4)])
        >>> [a.shape for a in state.mu[0]], state.mu[1][0].shape, state.momentum
        ([torch.Size([2, 1]), torch.Size([1, 3])], torch.Size([4]), None)
    """

    mu: list[tuple[Tensor, ...]]
    momentum: list[Tensor] | None


def _check_number(name: str, value: Any) -> None:
    if callable(value) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scale_by_sm3 takes a number for {name}, got {value!r} (it keeps no "
                         "step count; ChainOptimizer resolves a schedule before building it)")


def _cover(param: Tensor) -> tuple[Tensor, ...]:
    """The zero accumulators of one parameter."""
    options = dict(dtype=state_dtype(param), device=param.device)
    if param.dim() <= 1:
        return (torch.zeros(param.shape, **options),)
    r = param.dim()
    return tuple(torch.zeros([n if a == i else 1 for i in range(r)], **options)
                 for a, n in enumerate(param.shape))


def _check_leaf(g: Tensor) -> None:
    if g.is_complex():
        raise ValueError("scale_by_sm3 does not support complex tensors; optimize "
                         "torch.view_as_real(param) instead")
    if g.layout == torch.sparse_coo:
        if g.sparse_dim() != 1:
            raise ValueError(
                f"scale_by_sm3 takes sparse gradients with sparse rows only (sparse_dim 1, as "
                f"from nn.Embedding(sparse=True)); got sparse_dim {g.sparse_dim()}")
    elif g.layout != torch.strided:
        raise ValueError(f"scale_by_sm3 takes dense or row-sparse COO gradients, got layout "
                         f"{g.layout}")


def scale_by_sm3(b1: float = 0.0, b2: float = 1.0, eps: float = 1e-30,
                 ema_accumulator_rule: str = "assign") -> GradientTransformation:
    r"""SM3-II's preconditioner (Anil, Gupta, Koren & Singer, 2019), ALGORITHMS.md §1.

    For a leaf of rank :math:`r \ge 2` with accumulators :math:`\mu^a` (one vector per axis)
    and :math:`c = 1, d = 1` when :math:`\beta_2 = 1`, else :math:`c = 1-\beta_2, d = \beta_2`:

    .. math::
        \nu_t(i) = d \min_a \mu^a_{t-1}[i_a] + c\, g_t(i)^2, \qquad
        p_t(i) = \frac{g_t(i)}{\sqrt{\nu_t(i) + \epsilon}}\;(0 \text{ where } \nu_t(i) = 0),
        \\
        \mu^a_t[j] = \max_{i:\, i_a = j} \nu_t(i), \qquad
        o_t = p_t \;\text{or, if } \beta_1 > 0,\; m_t = \beta_1 m_{t-1} + (1-\beta_1) p_t,
        \; o_t = m_t

    :math:`\nu_t` upper-bounds Adagrad's accumulator :math:`\sum_{s \le t} g_s^2`. Rank 0 and 1
    leaves are exact diagonal Adagrad (:math:`\mu = \nu`). Memory: :math:`\sum_a n_a` state
    values per leaf, plus the momentum buffer only when ``b1 > 0``; neither moment is
    bias-corrected.

    Defaults (torch-SM3 and the TF original): ``b1 = 0`` (no momentum, no buffer), ``b2 = 1``
    (sums of squares; ``b2 < 1`` is the EMA variant), ``eps = 1e-30`` inside the square root.
    The output is exactly 0 where :math:`\nu_t = 0`, whatever ``eps``. With ``b2 < 1``,
    ``ema_accumulator_rule="assign"`` (authors, optax) sets :math:`\mu^a` as above, so the
    accumulators can decay; ``"running_max"`` keeps :math:`\max(\mu^a_{t-1}, \cdot)` instead,
    as torch-SM3 does (they never decrease).

    Sparse gradients (COO with sparse rows, e.g. ``nn.Embedding(sparse=True)``) use the row
    cover only, :math:`\mu^0`: duplicates are summed first; each present row ``j`` gets
    :math:`\nu_j = d\,\mu^0[j] + c\,G_j^2`, :math:`P_j = G_j / \sqrt{\nu_j + \epsilon}` and
    :math:`\mu^0[j] = \max \nu_j`; absent rows keep their accumulator. The output is sparse with
    the same indices, and momentum is not applied to it (the TF original; torch-SM3 zeroes the
    absent rows' accumulators instead). The other axes' accumulators are not maintained by
    sparse steps.

    Args:
        b1: momentum, in [0, 1).
        b2: 1 for sums of squares, in (0, 1) for exponential moving averages.
        eps: >= 0, added to :math:`\nu_t` inside the square root.
        ema_accumulator_rule: ``"assign"`` or ``"running_max"`` (matters only for b2 < 1).

    ``b1``, ``b2`` and ``eps`` are numbers, not schedules: the state keeps no step count
    (``ChainOptimizer`` evaluates a schedule given as a hyperparameter before building the
    transform). A state initialised with ``b1 = 0`` has no momentum buffers and cannot be
    continued with ``b1 > 0``.

    Example:
        >>> tx = scale_by_sm3(eps=0.0)
        >>> state = tx.init([torch.zeros(2, 3)])
        >>> g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> out, state = tx.update([g], state)
        >>> out[0]  # the first step is g / |g|
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
        >>> out, state = tx.update([g], state)
        >>> state.mu[0]  # rows and columns of nu = min(row, column) + g^2
        (tensor([[18.],
                [72.]]), tensor([[32., 50., 72.]]))
    """
    _check_number("b1", b1)
    _check_number("b2", b2)
    _check_number("eps", eps)
    check_decay("b1", b1)
    if not 0.0 < b2 <= 1.0:
        raise ValueError(f"b2 must be in (0, 1], got {b2}")
    check_non_negative("eps", eps)
    check_choice("ema_accumulator_rule", ema_accumulator_rule, _RULES)
    c, d = (1.0, 1.0) if b2 == 1.0 else (1.0 - b2, float(b2))
    running_max = ema_accumulator_rule == "running_max" and b2 < 1.0
    rule = _Rule(float(b1), c, d, float(eps), running_max)

    def init(params: Tree) -> SM3State:
        p = leaves(params)
        check_whole(p, "scale_by_sm3 (SM3)", "its covers are maxima along every axis of a whole "
                    "parameter, and a shard holds only some of the rows")
        return SM3State(mu=[_cover(x) for x in p], momentum=zeros_like_state(p) if b1 > 0 else None)

    def checked(u: list[Tensor], state: SM3State) -> list[Tensor | None]:
        """The momentum buffer of every leaf (None without), after the checks of ``update``."""
        if len(state.mu) != len(u):
            raise ValueError(f"scale_by_sm3 has state for {len(state.mu)} parameters, got "
                             f"{len(u)} updates")
        for g in u:
            _check_leaf(g)
        if b1 > 0 and state.momentum is None:
            raise ValueError("scale_by_sm3(b1 > 0) was handed a state without momentum buffers "
                             "(initialised with b1 = 0); re-initialise the state")
        return state.momentum or [None] * len(u)

    def outputs(u: list[Tensor], state: SM3State, momentum: list[Tensor | None],
                blocked: bool, skip: list[bool]) -> list[Tensor | None]:
        """The outputs of the leaves not in ``skip`` (None for those)."""
        out: list[Tensor | None] = [None] * len(u)
        vectors = [i for i, g in enumerate(u) if blocked and rule.batches(g, state.mu[i][0])
                   and not skip[i]]
        for i, o in zip(vectors, rule.vectors([u[i] for i in vectors],
                                              [state.mu[i][0] for i in vectors],
                                              [momentum[i] for i in vectors])):
            out[i] = o
        for i, g in enumerate(u):
            if out[i] is not None or skip[i]:
                continue
            if g.layout == torch.sparse_coo:
                out[i] = rule.sparse(g, state.mu[i][0])
            else:
                out[i] = rule.dense(g, state.mu[i], momentum[i], blocked and g.device.type == "cpu")
        return out

    def update(updates: Tree, state: SM3State, params: Tree | None = None, **extras: Any):
        u = leaves(updates)
        if not u:
            return updates, state
        momentum = checked(u, state)
        out = outputs(u, state, momentum, not torch.compiler.is_compiling(), [False] * len(u))
        return as_tree(updates, out), state

    def into_params(updates: Tree, state: SM3State, params: Tree, a: float | Tensor,
                    b: float | Tensor, **extras: Any) -> SM3State:
        """``update``, then ``x <- x + b·x + a·o``, the same numbers; on CPU in eager mode each
        block of a dense leaf's output is added while in cache, computed in one scratch block
        shared by the leaves: no output of the leaf's size is ever allocated."""
        u, x = leaves(updates), leaves(params)
        if not u:
            return state
        momentum = checked(u, state)
        blocked = not torch.compiler.is_compiling()
        fused = [blocked and not isinstance(a, Tensor) and not isinstance(b, Tensor)
                 and g.layout == torch.strided and g.device.type == "cpu" and g.numel() > 0
                 and not rule.batches(g, state.mu[i][0]) for i, g in enumerate(u)]
        scratch: dict[torch.dtype, Tensor] = {}  # one block's nu, for every leaf in turn
        for i, g in enumerate(u):
            if fused[i]:
                rule.dense(g, state.mu[i], momentum[i], True, into=(x[i], a, b, scratch))
        out = outputs(u, state, momentum, blocked, fused)
        rest = [i for i in range(len(u)) if not fused[i]]
        if rest:
            add_scaled_([x[i] for i in rest], [out[i] for i in rest], a, b)
        return state

    return GradientTransformation(init, update, leafwise=True, elementwise=False,
                                  accepts_sparse=True, into_params=into_params)


def _scratch(cache: dict[torch.dtype, Tensor], size: int, dtype: torch.dtype,
             device: torch.device) -> Tensor:
    """A flat buffer of at least ``size`` entries, kept in ``cache`` for the next leaf."""
    buffer = cache.get(dtype)
    if buffer is None or buffer.numel() < size or buffer.device != device:
        buffer = cache[dtype] = torch.empty(size, dtype=dtype, device=device)
    return buffer


class _Rule(NamedTuple):
    """The per-leaf arithmetic of one configuration of ``scale_by_sm3``."""

    b1: float
    c: float
    d: float
    eps: float
    running_max: bool

    def _assign(self, accumulator: Tensor, new: Tensor) -> None:
        """mu <- new, or mu <- max(mu, new) under the running-max rule."""
        new = new.to(accumulator.dtype)
        if self.running_max:
            torch.maximum(accumulator, new, out=accumulator)
        else:
            accumulator.copy_(new)

    def _root(self, nu: Tensor, guard: bool = True, add_eps: bool = True) -> None:
        """``nu <- 1 / sqrt(nu + eps)``, exactly 0 where ``nu == 0`` (so that ``g`` times it is
        ``g / sqrt(nu + eps)`` guarded).

        ``guard=False`` when the caller knows that ``nu > 0`` everywhere, ``add_eps=False`` when
        it knows that ``nu + eps == nu`` everywhere."""
        zero = nu == 0 if guard else None
        if self.eps and add_eps:
            nu.add_(self.eps)
        nu.rsqrt_()
        if zero is not None:
            nu.masked_fill_(zero, 0.0)

    def _plan(self, mu: tuple[Tensor, ...], step: int, dtype: torch.dtype
              ) -> list[tuple[bool, bool]]:
        """``(guard, add_eps)`` for each block of ``step`` rows, from the small accumulators.

        nu >= f = d min_a mu^a entry by entry (rounding is monotonic), so a block whose
        smallest f is > 0 needs no 0/0 guard, and if moreover f + eps == f in nu's dtype, adding
        eps changes none of its entries (a larger x has a coarser spacing): both are skipped,
        and the result is bitwise the same. The leaf's smallest f decides first, with margins
        (in float64, a normal f, and eps below an eighth of f's relative spacing, so below half
        the spacing of any number of nu's dtype from f up)."""
        blocks = -(-mu[0].numel() // step)
        info = torch.finfo(dtype)
        least = self.d * torch.cat([accumulator.reshape(-1) for accumulator in mu]).amin().item()
        if least >= 2 * info.tiny and 8 * self.eps < least * info.eps:
            return [(False, False)] * blocks
        floor = mu[0].reshape(-1).to(dtype)
        for accumulator in mu[1:]:
            floor = torch.minimum(floor, accumulator.amin().to(dtype))
        if self.d != 1.0:
            floor = floor * self.d
        floor = torch.cat([floor, floor.new_full((blocks * step - floor.numel(),), math.inf)])
        floor = floor.view(blocks, step).amin(dim=1)
        guard = ~(floor > 0)
        add_eps = guard | (floor + self.eps != floor)
        return list(zip(guard.tolist(), add_eps.tolist()))

    def batches(self, g: Tensor, mu: Tensor) -> bool:
        """Whether a leaf goes with the small vectors of ``vectors``: dense, rank <= 1, fewer
        than ``PLAN_ELEMENTS`` entries, on the CPU, of its state's dtype, and eps > 0 in it."""
        return (g.layout == torch.strided and g.dim() <= 1 and 0 < g.numel() < PLAN_ELEMENTS
                and g.device.type == "cpu" and g.dtype == mu.dtype
                and self.eps >= torch.finfo(mu.dtype).tiny)

    def vectors(self, g: list[Tensor], mu: list[Tensor], m: list[Tensor | None]) -> list[Tensor]:
        """``dense`` for small vectors (``batches``), all at once with foreach ops, bitwise
        the same: with eps > 0, ``g / sqrt(nu + eps)`` is finite where ``nu == 0`` (there g^2
        underflowed), and multiplying by ``sign(nu)``, 0 there and 1 elsewhere, is the guard."""
        if not g:
            return []
        shapes = [x.shape for x in g]
        g, mu = [x.reshape(-1) for x in g], [x.reshape(-1) for x in mu]
        if self.d == 1.0:
            nu = torch._foreach_addcmul(mu, g, g, value=self.c)
        else:
            nu = torch._foreach_mul(mu, self.d)
            torch._foreach_addcmul_(nu, g, g, value=self.c)
        if self.running_max:
            torch._foreach_maximum_(mu, nu)
        else:
            torch._foreach_copy_(mu, nu)
        positive = torch._foreach_sign(nu)
        torch._foreach_add_(nu, self.eps)
        torch._foreach_rsqrt_(nu)
        torch._foreach_mul_(nu, g)
        torch._foreach_mul_(nu, positive)
        out = [x.view(shape) for x, shape in zip(nu, shapes)]
        pairs = [(o, x) for o, x in zip(out, m) if x is not None]
        if pairs:  # m <- b1 m + (1 - b1) p; o = m
            outputs, buffers = (list(t) for t in zip(*pairs))
            torch._foreach_lerp_(buffers, outputs, 1.0 - self.b1)
            torch._foreach_copy_(outputs, buffers)
        return out

    def dense(self, g: Tensor, mu: tuple[Tensor, ...], m: Tensor | None, blocked: bool,
              into: tuple[Tensor, float, float, dict[torch.dtype, Tensor]] | None = None
              ) -> Tensor | None:
        """The output for a dense leaf; updates ``mu`` (and ``m``) in place. ``blocked``: in
        blocks of rows (CPU, eager), else in one piece (``_whole``). With ``into = (x, a, b,
        scratch)`` (blocked only) no output: each block is added to the parameter, ``x <- x +
        b·x + a·o``, and its nu is computed in the ``scratch`` cache's buffer (``_scratch``).
        """
        dtype = torch.promote_types(g.dtype, mu[0].dtype)
        if g.numel() == 0:
            return torch.empty(g.shape, dtype=dtype, device=g.device)
        if g.dim() == 0:  # a scalar is a vector of one entry (reshapes of 0-d tensors are views;
            # in-place updates of 0-d float64 inputs are also lost under torch.compile 2.13)
            g, mu = g.reshape(1), (mu[0].reshape(1),)
            m = None if m is None else m.reshape(1)
            if into is not None:
                return self.dense(g, mu, m, blocked, (into[0].reshape(1), *into[1:]))
            return self.dense(g, mu, m, blocked).reshape(())
        if not blocked:
            return self._whole(g, mu, m)
        n0, row = g.shape[0], g.numel() // g.shape[0]
        step = min(n0, max(1, BLOCK_ELEMENTS // row))
        # nu is computed in the output's rows, or, when added to x, in one block's scratch
        out = torch.empty(g.shape, dtype=dtype, device=g.device) if into is None else \
            _scratch(into[3], step * row, dtype, g.device)
        # skip the guard and eps where the accumulators show them idle
        plan = self._plan(mu, step, dtype) if g.numel() >= PLAN_ELEMENTS else None
        others: list[Tensor | None] = [None] * (len(mu) - 1)  # new mu^a, a >= 1, over blocks
        for start in range(0, n0, step):
            rows = slice(start, start + step)
            g_rows = g[rows]
            nu = out[rows] if into is None else out[:g_rows.numel()].view(g_rows.shape)
            self._rows(g_rows, mu, rows, others, nu)
            self._root(nu, *(plan[start // step] if plan else ()))
            o = nu.mul_(g_rows)  # the preconditioned gradient p
            if m is not None:  # m <- b1 m + (1 - b1) p; o = m
                o = m[rows].lerp_(nu, 1.0 - self.b1)
            if into is not None:
                x_rows, a, b = into[0][rows], into[1], into[2]
                if b != 0:
                    x_rows.add_(x_rows, alpha=b)
                x_rows.add_(o, alpha=a)
            elif m is not None:
                nu.copy_(o)
        for accumulator, new in zip(mu[1:], others):
            self._assign(accumulator, new)
        return out if into is None else None

    def _whole(self, g: Tensor, mu: tuple[Tensor, ...], m: Tensor | None) -> Tensor:
        """``dense`` in one piece, as plain functions of the inputs: under ``torch.compile``
        (which fuses them) and off the CPU. The same arithmetic as the blocks, in eager mode."""
        previous = mu[0]
        for accumulator in mu[1:]:
            previous = torch.minimum(previous, accumulator)
        nu = torch.addcmul(previous if self.d == 1.0 else previous * self.d, g, g, value=self.c)
        if len(mu) == 1:
            self._assign(mu[0], nu)
        axes = range(g.dim())
        for a in axes if len(mu) > 1 else ():
            self._assign(mu[a], nu.amax(dim=tuple(k for k in axes if k != a), keepdim=True))
        denominator = torch.rsqrt(nu + self.eps) if self.eps else torch.rsqrt(nu)
        out = torch.where(nu == 0, 0.0, g * denominator)
        if m is None:
            return out
        m.lerp_(out, 1.0 - self.b1)
        return m.clone()

    def _rows(self, g: Tensor, mu: tuple[Tensor, ...], rows: slice, others: list[Tensor | None],
              nu: Tensor) -> None:
        """One block of rows: ``nu`` (written into the buffer ``nu``) and the accumulators."""
        mu0 = mu[0][rows]
        if len(mu) == 1:  # rank <= 1: diagonal Adagrad, nu = d mu + c g^2
            if self.d == 1.0:
                torch.addcmul(mu0, g, g, value=self.c, out=nu)
            else:
                torch.mul(mu0, self.d, out=nu).addcmul_(g, g, value=self.c)
            self._assign(mu0, nu)
            return
        # nu = d min_a mu^a + c g^2 (broadcast), then mu^a = max of nu over all axes but a
        previous = mu0
        for k, accumulator in enumerate(mu[1:], start=2):
            previous = torch.minimum(previous, accumulator, out=nu) if k == len(mu) else \
                torch.minimum(previous, accumulator)
        if self.d != 1.0:
            nu.mul_(self.d)
        nu.addcmul_(g, g, value=self.c)
        axes = range(g.dim())
        self._assign(mu0, nu.amax(dim=tuple(axes[1:]), keepdim=True))
        for a in axes[1:]:
            part = nu.amax(dim=tuple(k for k in axes if k != a), keepdim=True)
            if others[a - 1] is None:
                others[a - 1] = part
            else:
                torch.maximum(others[a - 1], part, out=others[a - 1])

    def sparse(self, g: Tensor, mu0: Tensor) -> Tensor:
        """The output for a row-sparse leaf: the row cover ``mu0`` only, present rows only."""
        g = g.coalesce()
        index = g.indices()
        rows, values = index[0], g.values()
        previous = mu0.index_select(0, rows)  # (nnz, 1, ..., 1): broadcasts over the rows
        nu = torch.addcmul(previous if self.d == 1.0 else previous * self.d, values, values,
                           value=self.c)
        new = nu.amax(dim=tuple(range(1, nu.dim())), keepdim=True) if nu.dim() > 1 else nu
        if self.running_max:
            new = torch.maximum(previous, new)
        mu0.index_copy_(0, rows, new.to(mu0.dtype))
        self._root(nu)
        out = nu.mul_(values)
        return torch.sparse_coo_tensor(index, out, g.shape, is_coalesced=True,
                                       check_invariants=False)
