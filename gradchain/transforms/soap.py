r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (ALGORITHMS.md §5).

Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam" (2024), with HeavyBall's
defaults and in-place debiasing. A leaf of rank r (after merging small axes, ``merged_shape``)
keeps, for every axis a with :math:`1 < d_a \le` ``max_precond_dim``, an EMA :math:`L_a` of the
mode-a Gram matrix of the gradient and an orthogonal basis :math:`Q_a` of its (estimated)
eigenvectors. The projection and its inverse are

.. math::
    P(X) = X \times_0 Q_0 \cdots \times_{r-1} Q_{r-1}, \qquad
    P^{-1}(Y) = Y \times_0 Q_0^\top \cdots \times_{r-1} Q_{r-1}^\top

(:math:`Q_0^\top X Q_1` and :math:`Q_0 Y Q_1^\top` for a matrix; the identity on the other
axes), and Adam runs on :math:`P(G)`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    _caller_stacklevel,
    GradientTransformation,
    Hyper,
    Tree,
    add_scaled_,
    all_finite,
    as_tree,
    check_choice,
    check_decay,
    check_dense_real,
    check_non_negative,
    debiased_decay,
    decay_product,
    divide_into_,
    leaves,
    resolve,
    second_moment_decay,
    state_dtype,
)
from gradchain.distributed import check_whole

__all__ = ["SoapState", "soap_precondition", "merged_shape", "refresh_due"]

#: Per leaf, one entry per (merged) axis: a matrix for a preconditioned axis, else ``None``.
Matrices = tuple[Tensor | None, ...]
Frequency = int | Callable[[int], float]
#: Two flat buffers per dtype and device, reused by the matrices of a step (``_workspace``).
Workspace = dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]]
#: Where a step adds its outputs: (parameters, a, b) for x <- x + b·x + a·o.
Into = tuple[list[Tensor], float | Tensor, float | Tensor]


class SoapState(NamedTuple):
    """State of ``soap_precondition``.

    ``count``: calls so far that were not skipped (the first one only initialises).
    ``refresh_accumulator``: :math:`\\sum_j 1/f(j)` for a refresh schedule (0 for a constant
    frequency). ``mu_rotated``: whether ``mu`` is in the rotated basis (True; while the refresh
    interval is at least 2 updates) or in the parameters' (False) for the next update. Per
    parameter, in its merged shape (``merged_shape``): ``mu``, the first moment (``None`` when
    ``b1 == 0``), and ``nu``, the second moment in the rotated basis; ``gram`` and ``basis``,
    one entry per merged axis: the Gram EMA :math:`L_a` and the basis :math:`Q_a` (both
    :math:`d_a \\times d_a`), or ``None`` for an axis that is not preconditioned. :math:`L_a` is
    symmetric; between refreshes only its lower triangle is kept current (each refresh, which
    alone reads it, mirrors it onto the upper one), so read it as
    ``gram.tril() + gram.tril(-1).T``. Checkpoint keys: ``"mu"``, ``"nu"``,
    ``"gram.1"``, ``"basis.0"``, ...

    Example:
        >>> state = soap_precondition().init([torch.zeros(4, 3000)])  # 3000 > 2048: not rotated
        >>> [None if g is None else g.shape for g in state.gram[0]], state.nu[0].shape
        ([torch.Size([4, 4]), None], torch.Size([4, 3000]))
    """

    count: int
    refresh_accumulator: float
    mu_rotated: bool
    mu: list[Tensor | None]
    nu: list[Tensor]
    gram: list[Matrices]
    basis: list[Matrices]


# ----------------------------------------------------------------------------------------------
# Axis plan


def _group_sizes(sizes: Sequence[int], limit: int) -> list[int]:
    """Products of runs of consecutive sizes: a run grows while its product stays <= limit;
    a size that exceeds the limit on its own is a run of one."""
    groups, product = [], 1
    for size in sizes:
        if product * size > limit:
            if product > 1:
                groups.append(product)
                product = size
            else:
                groups.append(size)
        else:
            product *= size
    if product > 1:
        groups.append(product)
    return groups


def merged_shape(shape: Sequence[int], max_precond_dim: int, rule: str = "heavyball"
                 ) -> tuple[int, ...]:
    r"""The shape a leaf is viewed as before preconditioning (``merge_dims``, §5.4).

    ``"heavyball"`` (HeavyBall's fixed rule): axis 0 (fan-out) stays; the other axes are
    grouped from the last to the second, a group growing while its product is
    :math:`\le` ``max_precond_dim`` (strict ">" closes it); size-1 axes disappear.
    ``"original"`` (original SOAP): the same grouping over all axes from the first, axis 0
    included. Shapes of rank < 2 or with a zero size are returned unchanged.

    Example:
        >>> merged_shape((128, 64, 3, 3), 2048), merged_shape((10, 20, 30, 40), 2048)
        ((128, 576), (10, 20, 1200))
        >>> merged_shape((128, 64, 3, 3), 10000, rule="original")
        (8192, 9)
    """
    check_choice("rule", rule, _MERGE_RULES)
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or 0 in shape:
        return shape
    if rule == "original":
        return tuple(_group_sizes(shape, max_precond_dim)) or (1,)
    return (shape[0], *reversed(_group_sizes(shape[:0:-1], max_precond_dim)))


@functools.lru_cache(maxsize=4096)
def _axis_plan(shape: tuple[int, ...], max_precond_dim: int, merge_dims: bool, rule: str,
               precondition_1d: bool) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """(merged shape, whether each of its axes is preconditioned) for a parameter shape."""
    if math.prod(shape) == 0 or (len(shape) == 1 and not precondition_1d):
        return shape, (False,) * len(shape)
    if merge_dims:
        shape = merged_shape(shape, max_precond_dim, rule)
    return shape, tuple(1 < d <= max_precond_dim for d in shape)


# ----------------------------------------------------------------------------------------------
# Refresh schedule


def refresh_due(frequency: Frequency, k: int, accumulator: float) -> tuple[bool, float]:
    r"""Whether the bases are refreshed after the k-th real update (k >= 1), and the new
    accumulator (§5.7 step 8).

    A constant frequency f refreshes iff :math:`k \bmod f = 0` (integer arithmetic; the
    accumulator is returned unchanged). A callable interval f(k) (such as
    ``schedules.precond_schedule()``) adds :math:`1/f(k)` to the accumulator A and refreshes iff
    :math:`\lfloor A + 1/f(k) \rfloor > \lfloor A \rfloor`: after k updates there have been
    exactly :math:`\lfloor \sum_{j \le k} 1/f(j) \rfloor` refreshes, deterministically.

    Example:
        >>> [refresh_due(3, k, 0.0)[0] for k in range(1, 7)]
        [False, False, True, False, False, True]
        >>> refresh_due(lambda k: 2.0, 1, 0.0), refresh_due(lambda k: 2.0, 2, 0.5)
        ((False, 0.5), (True, 1.0))
    """
    if callable(frequency):
        updated = accumulator + 1.0 / frequency(k)
        return math.floor(updated) > math.floor(accumulator), updated
    return k % frequency == 0, accumulator


#: The refresh interval, in updates, from which m is kept in the rotated basis. Moving m into a
#: new basis costs about two projections (back through the old basis, forward through the new
#: one), keeping it in the parameters' basis one projection per update (P(m) at every step): the
#: rotated basis pays when the bases change at most every other update.
_ROTATED_MU_INTERVAL = 2.0


def _rotated_first_moment(frequency: Frequency, k: int) -> bool:
    """Whether the k-th real update keeps m in the rotated basis: iff the refresh interval
    f(k) is at least ``_ROTATED_MU_INTERVAL`` (always for a constant frequency >= 2, never for
    1; ``precond_schedule()`` from k = 1000 on)."""
    return (frequency(k) if callable(frequency) else frequency) >= _ROTATED_MU_INTERVAL


# ----------------------------------------------------------------------------------------------
# Linear algebra of one leaf


def _project(x: Tensor, basis: Matrices, back: bool = False) -> Tensor:
    """:math:`P(X)`, or :math:`P^{-1}(X)` with ``back``: mode products with :math:`Q_a`
    (:math:`Q_a^\\top`) on the preconditioned axes. Matrices use two plain matmuls
    (``_project_matrix``); other ranks contract axis 0 at a time, which cycles the axes back
    into place."""
    if x.dim() == 2:
        return _project_matrix(x, basis, back)
    for q in basis:
        x = x.movedim(0, -1) if q is None else torch.tensordot(x, q, ([0], [1 if back else 0]))
    return x


def _project_matrix(x: Tensor, basis: Matrices, back: bool = False,
                    middle: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``_project`` of a matrix, :math:`Q_0^\\top X Q_1` (:math:`Q_0 X Q_1^\\top` with
    ``back``), optionally into given buffers of x's shape: the last product writes ``out``,
    the first of two ``middle`` (None: new tensors). Neither may hold x."""
    left, right = basis
    if left is not None:
        x = torch.mm(left if back else left.T, x, out=out if right is None else middle)
    if right is not None:
        x = torch.mm(x, right.T if back else right, out=out)
    return x


def _change_basis_(x: Tensor, basis: Matrices, back: bool,
                   buffers: tuple[Tensor, Tensor] | None) -> None:
    """:math:`x \\leftarrow P(x)`, or :math:`P^{-1}(x)` with ``back``, in place; a matrix goes
    through ``buffers`` (two flat tensors of at least its size; None: allocated)."""
    if buffers is None or x.dim() != 2:
        x.copy_(_project(x, basis, back))
        return
    middle, last = (buffer[:x.numel()].view(x.shape) for buffer in buffers)
    moved = _project_matrix(x, basis, back, middle=middle,
                            out=x if all(q is not None for q in basis) else last)
    if moved is not x:
        x.copy_(moved)


_SYMMETRIC_BLOCK = 128  # up to this many rows a Gram block is one plain product (128 measured
# 6-8% faster than 256 and 512 on 2048-, 1536- and 512-row Grams at 2 threads; 64 no faster)


def _add_gram_(gram: Tensor, mat: Tensor, beta: float, alpha: float) -> None:
    """:math:`L \\leftarrow \\beta L + \\alpha\\, A A^\\top` on the lower triangle of L, in place,
    computing each off-diagonal block once: with :math:`A` split into row halves
    :math:`A_1, A_2`, the blocks are :math:`A_1A_1^\\top`, :math:`A_2A_2^\\top` (recursively) and
    :math:`A_2A_1^\\top`: three quarters of the work of one product per level. The blocks above
    the diagonal are left as they were (as BLAS's ``syrk`` leaves one triangle); ``_symmetrize_``
    mirrors them when the whole matrix is needed."""
    rows = mat.shape[0]
    if rows <= _SYMMETRIC_BLOCK:
        gram.addmm_(mat, mat.T, beta=beta, alpha=alpha)
        return
    half = rows // 2
    top, bottom = mat[:half], mat[half:]
    _add_gram_(gram[:half, :half], top, beta, alpha)
    _add_gram_(gram[half:, half:], bottom, beta, alpha)
    gram[half:, :half].addmm_(bottom, top.T, beta=beta, alpha=alpha)


def _symmetrize_(gram: Tensor) -> None:
    """Copies the blocks below the diagonal that ``_add_gram_`` updates onto those above it."""
    rows = gram.shape[0]
    if rows <= _SYMMETRIC_BLOCK:
        return
    half = rows // 2
    _symmetrize_(gram[:half, :half])
    _symmetrize_(gram[half:, half:])
    gram[:half, half:].copy_(gram[half:, :half].T)


def _accumulate_grams(g: Tensor, grams: Matrices, beta: float) -> None:
    """:math:`L_a \\leftarrow \\beta L_a + (1-\\beta)\\,\\mathrm{Gram}_a(G)` in place, where
    :math:`\\mathrm{Gram}_a(G)` contracts G with itself over every axis but a (exact for
    :math:`\\beta = 0`). A matrix's Grams are updated on their lower triangle (``_add_gram_``)."""
    for axis, gram in enumerate(grams):
        if gram is None:
            continue
        if g.dim() == 2:
            _add_gram_(gram, g if axis == 0 else g.T, beta, 1.0 - beta)
        else:
            others = [a for a in range(g.dim()) if a != axis]
            gram.mul_(beta).add_(torch.tensordot(g, g, (others, others)), alpha=1.0 - beta)


def _eigenbasis(gram: Tensor) -> Tensor | None:
    """Eigenvectors of the symmetric ``gram``, columns by descending eigenvalue, in its dtype.

    Retried in float64 (then on the CPU) when ``torch.linalg.eigh`` fails or returns non-finite
    values; ``None`` when every attempt does."""
    attempts = [gram]
    if gram.dtype != torch.float64:
        attempts.append(gram.double())
    if gram.device.type != "cpu":
        attempts.append(gram.double().cpu())
    for matrix in attempts:
        try:
            vectors = torch.linalg.eigh(matrix).eigenvectors
        except torch.linalg.LinAlgError:
            continue
        if bool(vectors.isfinite().all()):
            return vectors.flip(-1).to(gram)
    return None


def _orthonormal(a: Tensor, work: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Q of the QR decomposition of the square ``a`` (Householder, as ``torch.linalg.qr``; R,
    which a refresh does not use, is not formed), computed in ``work`` (``_square_buffers``:
    the reflectors, their scales and Q) and returned in its last buffer."""
    reflectors, tau, q = work
    torch.geqrf(a, out=(reflectors, tau))
    return torch.linalg.householder_product(reflectors, tau, out=q)


def _square_buffers(cache: dict[tuple[Any, ...], tuple[Tensor, ...]], gram: Tensor, axis: int
                    ) -> tuple[Tensor, ...]:
    """Five buffers for the refresh of the basis of ``gram`` along ``axis``, kept in ``cache``
    for the other leaves of a refresh: (L Q)^T and its rows in eigenvalue order (row-major),
    geqrf's reflectors, their scales, and the new basis (column-major, as LAPACK writes them).
    Keyed by axis too, so that a leaf's new bases coexist until its first moment has moved."""
    key = (gram.shape[0], gram.dtype, gram.device, axis)
    if key not in cache:
        d, options = gram.shape[0], dict(dtype=gram.dtype, device=gram.device)
        cache[key] = (torch.empty(d, d, **options), torch.empty(d, d, **options),
                      torch.empty(d, d, **options).T, torch.empty(d, **options),
                      torch.empty(d, d, **options).T)
    return cache[key]


def _refresh(grams: Matrices, basis: Matrices, nu: Tensor, mu: Tensor | None,
             buffers: tuple[Tensor, Tensor] | None,
             squares: dict[tuple[Any, ...], tuple[Tensor, ...]]) -> None:
    """One power-iteration step and a QR per preconditioned axis, in place (§5.7 step 9).

    The columns of :math:`Q_a` are first sorted by the estimated eigenvalues
    :math:`\\mathrm{diag}(Q_a^\\top L_a Q_a)` (column-wise), descending, and ``nu`` is permuted
    along axis a by the same order; then :math:`Q_a \\leftarrow \\mathrm{QR}(L_a Q_a).Q`.

    ``mu`` (given when m is kept in the rotated basis) moves to the new one,
    :math:`m \\leftarrow P_{new}(P_{old}^{-1}(m))`. Per axis that is
    :math:`m \\times_a Q_{a,old}^\\top \\times_a Q_{a,new}`, or one product with
    :math:`R_a = Q_{a,old}^\\top Q_{a,new}`, cheaper when :math:`d_a^2 <` numel
    (:math:`2d_a^3` for R against :math:`2\\,\\mathrm{numel}\\,d_a` for the extra product).
    An axis whose Gram matrix is not finite keeps its basis (with a warning), so an overflow never
    reaches the parameters. For a matrix, ``buffers`` (two flat tensors of at least its size)
    hold the permuted ``nu`` and ``mu`` on its way (None: allocated); the d x d products and the
    QR are computed in ``squares`` (``_square_buffers``), shared by the leaves of a refresh.
    """
    if not _rotates(basis):
        return
    fresh: list[Tensor | None] = []
    for axis, (gram, q) in enumerate(zip(grams, basis)):
        if gram is None or q is None:
            fresh.append(None)
            continue
        _symmetrize_(gram)
        power_t, ordered, *work = _square_buffers(squares, gram, axis)
        torch.mm(q.T, gram, out=power_t)  # (L_a Q_a)^T: its rows are gathered fast, and geqrf
        # reads their transpose without the copy into column-major order that a row-major
        # matrix needs
        if not bool(power_t.sum().isfinite()):  # a NaN or an infinity (or a sum that overflows)
            warnings.warn("soap_precondition: a Gram matrix is not finite (overflow?); keeping "
                          "its eigenbasis", RuntimeWarning, stacklevel=_caller_stacklevel())
            fresh.append(None)
            continue
        order = torch.argsort(torch.linalg.vecdot(q.T, power_t), descending=True)
        permuted = None if buffers is None else buffers[0][:nu.numel()].view(nu.shape)
        nu.copy_(torch.index_select(nu, axis, order, out=permuted))
        fresh.append(_orthonormal(torch.index_select(power_t, 0, order, out=ordered).T,
                                  tuple(work)))
    if mu is not None:
        one_product = [f is not None and f.shape[0] ** 2 < mu.numel() for f in fresh]
        old = tuple(None if f is None or r else q for q, f, r in zip(basis, fresh, one_product))
        new = tuple(q.T @ f if r else f for q, f, r in zip(basis, fresh, one_product))
        if buffers is None:
            mu.copy_(_project(_project(mu, old, back=True), new))
        else:
            a, b = (buffer[:mu.numel()].view(mu.shape) for buffer in buffers)
            if _project_matrix(mu, old, back=True, middle=a, out=b) is mu:  # no product back
                mu.copy_(_project_matrix(mu, new, middle=a, out=b))
            else:
                _project_matrix(b, new, middle=a, out=mu)
    for q, f in zip(basis, fresh):
        if f is not None:
            q.copy_(f)


# ----------------------------------------------------------------------------------------------
# The transform

_EPS_MODES = ("max", "add")
_DEBIAS = ("inplace", "adam")
_MERGE_RULES = ("heavyball", "original")


def _check_frequency(frequency: Any) -> None:
    if callable(frequency):
        return
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError("precondition_frequency must be an integer >= 1 or a callable "
                         f"interval k -> f(k) (e.g. schedules.precond_schedule()), got "
                         f"{frequency!r}")


def _check_max_precond_dim(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_precond_dim must be an integer >= 1, got {value!r}")


def soap_precondition(b1: Hyper = 0.9, b2: Hyper = 0.95, shampoo_beta: Hyper | None = None,
                      eps: Hyper = 1e-8, eps_mode: str = "max", debias: str = "inplace",
                      precondition_frequency: Frequency = 2, max_precond_dim: int = 2048,
                      merge_dims: bool = True, merge_rule: str = "heavyball",
                      precondition_1d: bool = False, normalize_grads: bool = False,
                      strict: bool = False) -> GradientTransformation:
    r"""SOAP's preconditioner: Adam in the eigenbasis of Shampoo's (ALGORITHMS.md §5).

    The first call only initialises: :math:`L_a = \mathrm{Gram}_a(G)` and :math:`Q_a` =
    its eigenvectors by descending eigenvalue; it outputs exact zeros (the current gradient is
    never used inside the projection applied to it). At the k-th real update (k = 1, 2, ...),
    with the projection P of the current bases (module docstring):

    .. math::
        G' = P(G_k), \quad
        m \leftarrow \hat\beta_1 m + (1-\hat\beta_1)\, G', \quad
        v \leftarrow \hat\beta_2 v + (1-\hat\beta_2)\, G'^2, \quad
        o = P^{-1}\Bigl(\frac{m}{\max(\sqrt v, \epsilon)}\Bigr), \\
        L_a \leftarrow \beta_s L_a + (1-\beta_s)\,\mathrm{Gram}_a(G_k)

    with the in-place debiased decays :math:`\hat\beta_i = 1 - (1-\beta_i)/(1-P_{i,k})`
    (``core.debiased_decay``; :math:`P_{i,k} = \beta_i^k`, or 0 for ``palm_beta2``), so that m
    and v are Adam's bias-corrected moments (HeavyBall). Every ``precondition_frequency``
    updates (or on a schedule, ``refresh_due``) the bases are refreshed: the columns of
    :math:`Q_a` are sorted by :math:`\mathrm{diag}(Q_a^\top L_a Q_a)`, descending, v is
    permuted along axis a alike, and :math:`Q_a \leftarrow \mathrm{QR}(L_a Q_a).Q`.

    m is kept in the rotated basis (the original SOAP's later form) while the refresh interval
    is at least 2 updates: a step costs two projections (G forward, the update back) and the
    Gram update; a refresh also moves m into the new basis (about two projections more). When
    the bases are refreshed more often (``precondition_frequency=1``, ``precond_schedule()``
    before update 1000), m stays in the parameters' basis, :math:`m \leftarrow \hat\beta_1 m
    + (1-\hat\beta_1) G_k` and :math:`o = P^{-1}(P(m)/\max(\sqrt v, \epsilon))`: a third
    projection per step, none at a refresh. Both are the same update in exact arithmetic
    (§5.7 step 4); m changes basis when the interval crosses 2. Cost per step
    :math:`O(n \sum_a d_a)` for n entries, per refresh :math:`O(\sum_a d_a^3)`; memory
    :math:`2n + 2\sum_a d_a^2` (n less when ``b1 = 0``, which keeps no first moment and
    divides :math:`G'` itself).

    Variants: ``debias="adam"`` (original SOAP) keeps raw EMAs with :math:`\beta_i` and scales
    the output by :math:`\sqrt{1-P_{2,k}}/(1-P_{1,k})`; ``eps_mode="add"`` divides by
    :math:`\sqrt v + \epsilon` (the original is ``debias="adam", eps_mode="add"``).
    ``normalize_grads`` divides each leaf's output by :math:`10^{-30}` + its RMS.

    Axes (§5.4): rank-0 and rank-1 leaves are plain Adam (no rotation; with
    ``precondition_1d`` a vector of size <= ``max_precond_dim`` is rotated); larger ranks are
    viewed as ``merged_shape(shape, max_precond_dim, merge_rule)`` when ``merge_dims``, and an
    axis is rotated iff :math:`1 < d_a \le` ``max_precond_dim`` (a 50000 x 768 embedding only on
    its 768 side: no matrix larger than that is ever allocated).

    Args:
        b1: first-moment decay, default 0.9; a number or a schedule of the 0-based count of
            real updates. 0 keeps no first moment.
        b2: second-moment decay, default 0.95; a number or a schedule (``palm_beta2``). A
            ``palm_beta2`` earlier in the chain replaces it.
        shampoo_beta: Gram EMA decay :math:`\beta_s` (a number or a schedule); ``None``
            (default) uses the step's second-moment decay (:math:`\hat\beta_2`, or the raw
            :math:`\beta_2` with ``debias="adam"``).
        eps: the floor (``"max"``) or the addend (``"add"``) of :math:`\sqrt v`, default 1e-8
            (a number or a schedule).
        eps_mode: ``"max"`` (default, HeavyBall) or ``"add"`` (original SOAP).
        debias: ``"inplace"`` (default, HeavyBall) or ``"adam"`` (original SOAP).
        precondition_frequency: refresh every f real updates (default 2), or a callable
            interval f(k) of the 1-based update index (``schedules.precond_schedule()``).
        max_precond_dim: the largest axis that is preconditioned, default 2048.
        merge_dims: view a leaf of rank >= 2 as its ``merged_shape`` (default True).
        merge_rule: ``"heavyball"`` (default) or ``"original"``, see ``merged_shape``.
        precondition_1d: rotate vectors too (default False).
        normalize_grads: scale each leaf's output to unit RMS (default False).
        strict: raise ``FloatingPointError`` on a non-finite gradient instead of skipping the
            step with a ``RuntimeWarning`` (a skipped step outputs zeros and leaves the state
            untouched, its count included).

    State dtype: float32 for 16-bit parameters, else the parameter's; Grams, bases,
    eigendecompositions and QR run in it. If ``torch.linalg.eigh`` fails it is retried in
    float64 (then on the CPU); if that fails too the basis stays the identity, with a warning.
    Put this transform first in its chain (after clipping only): its input feeds the Grams.
    Under ``torch.compile`` it runs eagerly; the rest of its chain compiles.

    Example:
        >>> tx = soap_precondition()
        >>> gen = torch.Generator().manual_seed(0)
        >>> state = tx.init([torch.zeros(4, 3)])
        >>> out, state = tx.update([torch.randn(4, 3, generator=gen)], state)
        >>> out[0].abs().max().item()  # the first call only initialises
        0.0
        >>> out, state = tx.update([torch.randn(4, 3, generator=gen)], state)
        >>> round(out[0].norm().item() ** 2, 4)  # P^-1(sign(P(G))): squared norm = numel
        12.0
        >>> [tuple(q.shape) for q in state.basis[0]]
        [(4, 4), (3, 3)]
    """
    check_decay("b1", b1)
    check_decay("b2", b2)
    if shampoo_beta is not None:
        check_decay("shampoo_beta", shampoo_beta)
    check_non_negative("eps", eps)
    check_choice("eps_mode", eps_mode, _EPS_MODES)
    check_choice("debias", debias, _DEBIAS)
    _check_frequency(precondition_frequency)
    _check_max_precond_dim(max_precond_dim)
    check_choice("merge_rule", merge_rule, _MERGE_RULES)
    momentum = callable(b1) or float(b1) != 0.0

    def leaf_state(p: Tensor) -> tuple[Tensor | None, Tensor, Matrices, Matrices]:
        shape, axes = _axis_plan(tuple(p.shape), max_precond_dim, merge_dims, merge_rule,
                                 precondition_1d)
        options = dict(dtype=state_dtype(p), device=p.device)
        grams = tuple(torch.zeros(d, d, **options) if on else None for d, on in zip(shape, axes))
        # bases column-major, as geqrf reads and householder_product writes them
        basis = tuple(torch.eye(d, **options).T if on else None for d, on in zip(shape, axes))
        mu = torch.zeros(shape, **options) if momentum else None
        return mu, torch.zeros(shape, **options), grams, basis

    def init(params: Tree) -> SoapState:
        check_whole(leaves(params), "soap_precondition (SOAP)", "it needs whole matrices: the "
                    "Gram matrix of the gradient along every axis, and its eigenbasis")
        per_leaf = [leaf_state(p) for p in leaves(params)]
        mu, nu, gram, basis = (list(field) for field in zip(*per_leaf)) if per_leaf else \
            ([], [], [], [])
        return SoapState(0, 0.0, _rotated_first_moment(precondition_frequency, 1), mu, nu, gram,
                         basis)

    def initialise(u: list[Tensor], state: SoapState) -> None:
        """The first call: exact Grams and their eigenbases."""
        for g, nu, grams, basis in zip(u, state.nu, state.gram, state.basis):
            g = g.reshape(nu.shape).to(nu.dtype)
            _accumulate_grams(g, grams, 0.0)
            for gram, q in zip(grams, basis):
                if gram is None or q is None:
                    continue
                _symmetrize_(gram)
                vectors = _eigenbasis(gram)
                if vectors is None:
                    warnings.warn("soap_precondition: torch.linalg.eigh failed (also in float64); "
                                  "keeping the identity basis until the next refresh",
                                  RuntimeWarning, stacklevel=_caller_stacklevel())
                else:
                    q.copy_(vectors)

    def decays(decay2: Hyper, count: int) -> tuple[float, float, float]:
        """(β1, β2, output scale) of the real update ``count + 1``."""
        if debias == "inplace":
            return debiased_decay(b1, count), debiased_decay(decay2, count), 1.0
        scale = math.sqrt(1.0 - decay_product(decay2, count)) / (1.0 - decay_product(b1, count))
        return resolve(b1, count), resolve(decay2, count), scale

    def moments(g: list[Tensor], rotated: list[Tensor], mu: list[Tensor | None],
                nu: list[Tensor], in_params: bool, beta1: float, beta2: float) -> None:
        """m (towards G in the parameters' basis with ``in_params``, else towards G') and v, in
        place."""
        if momentum:
            torch._foreach_lerp_(mu, g if in_params else rotated, 1.0 - beta1)
        torch._foreach_mul_(nu, beta2)
        torch._foreach_addcmul_(nu, rotated, rotated, 1.0 - beta2)

    def quotient(numerators: list[Tensor], nu: list[Tensor], den: list[Tensor], scale: float,
                 count: int) -> None:
        """scale · numerator / den into ``den`` (buffers of v's shapes, which may hold the
        numerators), den = max(√v, eps) or √v + eps."""
        for v, d in zip(nu, den):
            torch.sqrt(v, out=d)
        if eps_mode == "max":
            torch._foreach_clamp_min_(den, resolve(eps, count))
        else:
            torch._foreach_add_(den, resolve(eps, count))
        if scale != 1.0:
            torch._foreach_div_(den, scale)
        divide_into_(numerators, den)

    def step(u: list[Tensor], state: SoapState, decay2: Hyper, k: int, buffers: Workspace,
             into: Into | None) -> list[Tensor | None]:
        """The k-th real update (§5.7 steps 1-7): the outputs; moments and Grams in place.

        Rotated matrices go one at a time through ``buffers`` (``_workspace``: two per dtype
        and device, shared by all of them: the projections, the moments' quotient, the
        products back), so that a step allocates only its outputs, each fresh tensor being
        faulted into memory. With ``into`` = (params, a, b) their outputs are not allocated
        either: each is added to its parameter, :math:`x \\leftarrow x + b\\,x + a\\,o`, and
        its place in the result is None. The other leaves (vectors: plain Adam) go together
        through foreach ops. With m in the parameters' basis (``state.mu_rotated`` False), m
        follows G and the quotient's numerator is P(m)."""
        beta1, beta2, scale = decays(decay2, k - 1)
        in_params = momentum and not state.mu_rotated
        flat = [g.reshape(nu.shape).to(nu.dtype) for g, nu in zip(u, state.nu)]
        one_by_one = [i for i, (g, basis) in enumerate(zip(flat, state.basis))
                      if g.dim() == 2 and _rotates(basis)]
        together = sorted(set(range(len(flat))) - set(one_by_one))
        out: list[Tensor | None] = [None] * len(flat)
        for i in one_by_one:
            g, basis, mu, nu = flat[i], state.basis[i], state.mu[i], state.nu[i]
            middle, last = (b[:g.numel()].view(g.shape) for b in buffers[g.dtype, g.device])
            rotated = _project_matrix(g, basis, middle=middle, out=last)
            moments([g], [rotated], [mu], [nu], in_params, beta1, beta2)
            numerator = rotated if mu is None else mu
            if in_params:  # G' is spent: P(m) takes its buffer
                numerator = _project_matrix(mu, basis, middle=middle, out=last)
            quotient([numerator], [nu], [middle], scale, k - 1)
            if into is None:
                out[i] = _project_matrix(middle, basis, back=True, middle=last)
                continue
            # the last product back reads the other buffer: middle again after two products
            o = _project_matrix(middle, basis, back=True, middle=last,
                                out=middle if all(q is not None for q in basis) else last)
            normalize(o)
            params, a, b = into
            add_scaled_([params[i]], [o.view(params[i].shape)], a, b)
        if together:
            g = [flat[i] for i in together]
            basis = [state.basis[i] for i in together]
            rotated = [_project(x, q) if _rotates(q) else x for x, q in zip(g, basis)]
            mu, nu = [state.mu[i] for i in together], [state.nu[i] for i in together]
            moments(g, rotated, mu, nu, in_params, beta1, beta2)
            numerators = rotated if not momentum else \
                [_project(m, q) if in_params and _rotates(q) else m for m, q in zip(mu, basis)]
            den = [torch.empty_like(v) for v in nu]
            quotient(numerators, nu, den, scale, k - 1)
            for i, d in zip(together, den):
                out[i] = _project(d, state.basis[i], back=True) if _rotates(state.basis[i]) \
                    else d
        for o in out:
            if o is not None:
                normalize(o)
        shampoo = beta2 if shampoo_beta is None else resolve(shampoo_beta, k - 1)
        for g, grams in zip(flat, state.gram):
            _accumulate_grams(g, grams, shampoo)
        return [None if o is None else o.reshape(g.shape) for o, g in zip(out, u)]

    def normalize(o: Tensor) -> None:
        """With ``normalize_grads``: o divided in place by (its RMS + 1e-30)."""
        if normalize_grads and o.numel():
            o.div_(torch.linalg.vector_norm(o) / math.sqrt(o.numel()) + 1e-30)

    def advance(u: list[Tensor], state: SoapState, extras: dict[str, Any],
                into: Into | None = None) -> tuple[list[Tensor | None], SoapState]:
        """The outputs and the next state; with ``into`` (see ``step``) the rotated matrices'
        outputs are added to their parameters instead (None in their places)."""
        check_dense_real(u, "soap_precondition")
        if len(u) != len(state.nu):
            raise ValueError(f"soap_precondition has state for {len(state.nu)} parameters, got "
                             f"{len(u)} updates")
        if not all_finite(u):
            if strict:
                raise FloatingPointError("soap_precondition: non-finite gradient")
            warnings.warn("soap_precondition: non-finite gradient, step skipped", RuntimeWarning,
                          stacklevel=_caller_stacklevel())
            return _zeros(u, state), state
        k = state.count
        if k == 0:
            initialise(u, state)
            return _zeros(u, state), state._replace(count=1)
        due, accumulator = refresh_due(precondition_frequency, k, state.refresh_accumulator)
        buffers = _workspace([nu for nu, basis in zip(state.nu, state.basis)
                              if nu.dim() == 2 and _rotates(basis)])
        out = step(u, state, second_moment_decay(b2, extras), k, buffers, into) if u else []
        rotated = state.mu_rotated
        rotated_next = _rotated_first_moment(precondition_frequency, k + 1)
        if momentum and rotated and not rotated_next:
            move_first_moments(state, buffers, back=True)
        if due:
            squares: dict[tuple[Any, ...], tuple[Tensor, ...]] = {}
            for grams, basis, nu, mu in zip(state.gram, state.basis, state.nu, state.mu):
                _refresh(grams, basis, nu, mu if rotated and rotated_next else None,
                         buffers.get((nu.dtype, nu.device)) if nu.dim() == 2 else None, squares)
        if momentum and rotated_next and not rotated:
            move_first_moments(state, buffers, back=False)
        return out, state._replace(count=k + 1, refresh_accumulator=accumulator,
                                   mu_rotated=rotated_next)

    def move_first_moments(state: SoapState, buffers: Workspace, back: bool) -> None:
        """m of every rotated leaf into the rotated basis, or back to the parameters' one."""
        for mu, basis in zip(state.mu, state.basis):
            if mu is not None and _rotates(basis):
                _change_basis_(mu, basis, back,
                               buffers.get((mu.dtype, mu.device)) if mu.dim() == 2 else None)

    # Eager under torch.compile: inductor would hand the matrix products to the same BLAS,
    # while tracing them leaf by leaf, with the per-step decays and the refresh schedule as
    # guards, took 13 minutes on the 27M-parameter benchmark (benchmarks/peers.py) and gave a
    # step 1.6x slower than the eager one. The rest of a chain still compiles.
    @torch.compiler.disable
    def update(updates: Tree, state: SoapState, params: Tree | None = None, **extras: Any):
        out, state = advance(leaves(updates), state, extras)
        return as_tree(updates, out), state

    @torch.compiler.disable
    def into_params(updates: Tree, state: SoapState, params: Tree, a: float | Tensor,
                    b: float | Tensor, **extras: Any) -> SoapState:
        """``update``, then ``x <- x + b·x + a·o``, the same numbers; a rotated matrix's output
        is formed in the step's reused buffers and added at once, so no output of a
        parameter's size is allocated."""
        x = leaves(params)
        out, state = advance(leaves(updates), state, extras, (x, a, b))
        rest = [i for i, o in enumerate(out) if o is not None]
        if rest:
            add_scaled_([x[i] for i in rest], [out[i] for i in rest], a, b)
        return state

    return GradientTransformation(init, update, into_params=into_params)


def _rotates(basis: Matrices) -> bool:
    """Whether a leaf has a preconditioned axis."""
    return any(q is not None for q in basis)


def _workspace(matrices: list[Tensor]) -> Workspace:
    """Two flat buffers per dtype and device, each as large as the largest of ``matrices``."""
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for m in matrices:
        key = (m.dtype, m.device)
        sizes[key] = max(sizes.get(key, 0), m.numel())
    return {(dtype, device): tuple(torch.empty(size, dtype=dtype, device=device)
                                   for _ in range(2))
            for (dtype, device), size in sizes.items()}


def _zeros(u: list[Tensor], state: SoapState) -> list[Tensor]:
    """Exact zero outputs, in the state dtype."""
    return [torch.zeros(g.shape, dtype=nu.dtype, device=g.device) for g, nu in zip(u, state.nu)]
