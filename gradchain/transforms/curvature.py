"""Curvature preconditioners built from Hessian-vector products (ESGD-M's equilibration).

The transforms here read the ``hvp`` extra: a callable ``v -> H v`` for the Hessian of the same
minibatch loss whose gradient entered the chain, at the current parameters, over all leaves
jointly, taking and returning trees shaped like the updates. They say on which steps they need
it through ``GradientTransformation.needs_hvp``, so that a training loop builds the
double-backward graph (``loss.backward(create_graph=True)``) only on those steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradchain.core import (
    _caller_stacklevel,
    GradientTransformation,
    Tree,
    all_finite,
    as_tree,
    check_constant,
    check_decay,
    check_dense_real,
    check_non_negative,
    hessian_vector_products,
    hoist,
    leaves,
    writable,
    zeros_like_state,
)
from gradchain.distributed import CURVATURE_INSTEAD, check_whole

__all__ = ["scale_by_abs_hessian_diag", "is_hvp_step"]


class AbsHessianDiagState(NamedTuple):
    count: int
    hvp_count: int           # k: curvature estimates folded into d so far
    d: list[Tensor]          # EMA of (H z)^2, one buffer per parameter
    rng_state: Tensor        # state of the probes' own torch.Generator (CPU, uint8)


def is_hvp_step(step: int, update_d_every: int = 10, d_warmup: int = 20) -> bool:
    """Whether call ``step`` (1-based) of ``scale_by_abs_hessian_diag`` makes a curvature
    estimate: every one of the first ``d_warmup`` calls, then every ``update_d_every``-th.

    Example:
        >>> [t for t in range(1, 60) if is_hvp_step(t, update_d_every=10, d_warmup=20)][18:]
        [19, 20, 30, 40, 50]
        >>> [t for t in range(1, 12) if is_hvp_step(t, update_d_every=3, d_warmup=1)]
        [1, 4, 7, 10]
    """
    return step <= d_warmup or (step - d_warmup) % update_d_every == 0


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _rademacher(like: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Independent ±1 entries shaped like ``like``, on each leaf's device and dtype.

    One draw from the CPU ``generator`` covers every leaf, in tree order, so the probes depend
    on the seed and the shapes only, not on the devices.
    """
    sizes = [t.numel() for t in like]
    signs = torch.randint(0, 2, (sum(sizes),), generator=generator, dtype=torch.int8)
    signs.mul_(2).sub_(1)
    return [flat.view(t.shape).to(device=t.device, dtype=t.dtype)
            for t, flat in zip(like, signs.split(sizes))]




def _missing_hvp(step: int) -> ValueError:
    return ValueError(
        f"scale_by_abs_hessian_diag needs the 'hvp' extra (a callable v -> H v for the same "
        f"minibatch loss) on step {step}: pass hvp=... to update, or in an optimizer call "
        "loss.backward(create_graph=True) or pass a closure to step()"
    )


def scale_by_abs_hessian_diag(b2: float = 0.999, eps: float = 1e-4, update_d_every: int = 10,
                              d_warmup: int = 20, bias_correction: bool = True,
                              seed: int = 0) -> GradientTransformation:
    r"""Divide by ESGD's equilibration estimate of the curvature (Dauphin et al., 2015; ESGD-M).

    On curvature steps, draw a Rademacher probe :math:`z` (independent ±1 entries over all
    leaves), get :math:`h = Hz` from the ``hvp`` extra, and average its square:

    .. math::
        D \leftarrow b_2 D + (1-b_2)\, h^2, \quad k \leftarrow k + 1; \qquad
        \hat D = \frac{D}{1-b_2^k}, \qquad o = \frac{u}{\sqrt{\hat D} + \epsilon}

    Since :math:`E[(Hz)_i^2] = (H^2)_{ii}`, :math:`\sqrt{\hat D}` estimates the row norms of
    :math:`|H|`: positive even at saddle points, and exactly :math:`|H_{ii}|` when H is diagonal
    (a Rademacher probe then has no variance: after the first estimate :math:`\hat D = H_{ii}^2`
    for any :math:`b_2`). With eps = 0 the output is invariant to rescaling the loss, and
    changes as :math:`1/s` when the parameters are rescaled by :math:`s` (a fixed step in the
    original coordinates).

    Curvature steps: calls t = 1, ..., ``d_warmup``, then every ``update_d_every``-th
    (:func:`is_hvp_step`; with the defaults t = 1..20, 30, 40, ...). In between, D and k are
    reused. ``needs_hvp(state)`` tells a training loop when to build the double-backward
    graph; a curvature step without the ``hvp`` extra raises ``ValueError`` before changing
    anything. An estimate with a non-finite entry (in any leaf) is skipped, keeping D and k,
    and reported once per transform with a ``RuntimeWarning``. Until the first estimate the
    output is zero. ``bias_correction=False`` uses D itself.

    The probes come from this transform's own ``torch.Generator`` (seeded with ``seed``, drawn
    on the CPU and moved to each leaf's device and dtype), whose state lives in the transform
    state: the global random stream is untouched and a checkpoint continues with the same
    probes. Defaults: b2 = 0.999, eps = 1e-4 (added outside the root), update_d_every = 10,
    d_warmup = 20. State: ``d`` (D, one buffer per parameter, float32 for 16-bit parameters),
    ``hvp_count`` (k), ``count`` and ``rng_state``. Not leafwise: the probe and H z span all
    leaves.

    Example:
        >>> tx = scale_by_abs_hessian_diag(eps=0.0)
        >>> a = torch.tensor([4.0, -0.5])           # f = sum(a x^2) / 2: H = diag(a)
        >>> x = torch.tensor([1.0, 2.0])
        >>> out, state = tx.update([a * x], tx.init([x]), hvp=lambda v: [a * v[0]])
        >>> out  # a x / |a|
        [tensor([ 1., -2.])]
        >>> tx.needs_hvp(state)
        True
    """
    check_constant("scale_by_abs_hessian_diag", b2=b2, eps=eps)
    check_decay("b2", b2)
    check_non_negative("eps", eps)
    _check_count("update_d_every", update_d_every)
    _check_count("d_warmup", d_warmup)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    b2, eps = float(b2), float(eps)
    warned = False

    def init(params: Tree) -> AbsHessianDiagState:
        check_whole(leaves(params), "scale_by_abs_hessian_diag (ESGD)", "its Hessian-vector "
                    "products need the gradient's graph, which FSDP2's reduce-scattered "
                    "gradients do not carry", instead=CURVATURE_INSTEAD)
        generator = torch.Generator()
        generator.manual_seed(seed)
        return AbsHessianDiagState(count=0, hvp_count=0, d=zeros_like_state(leaves(params)),
                                   rng_state=generator.get_state())

    def update(updates: Tree, state: AbsHessianDiagState, params: Tree | None = None,
               **extras: Any):
        nonlocal warned
        u = leaves(updates)
        t = state.count + 1
        if not u:
            return updates, state._replace(count=t)
        check_dense_real(u, "scale_by_abs_hessian_diag")
        d, k, rng_state = state.d, state.hvp_count, state.rng_state
        if is_hvp_step(t, update_d_every, d_warmup):
            hvp = extras.get("hvp")
            if hvp is None:
                raise _missing_hvp(t)
            generator = torch.Generator()
            generator.set_state(rng_state)
            probes = _rademacher(u, generator)
            rng_state = generator.get_state()
            h = [x.to(di.dtype) for x, di in zip(hessian_vector_products(hvp, updates, probes), d)]
            squares = torch._foreach_mul(h, h)
            if all_finite(squares):
                torch._foreach_lerp_(d, squares, 1.0 - b2)   # D <- b2 D + (1 - b2) h^2
                k += 1
            elif not warned:
                warned = True
                warnings.warn(
                    f"scale_by_abs_hessian_diag: the Hessian-vector product of step {t} has "
                    "non-finite entries; that curvature estimate is skipped (the previous one "
                    "is kept). Later skips are not reported.", RuntimeWarning,
                    stacklevel=_caller_stacklevel())
        if k == 0:  # no curvature estimate yet
            out = [torch.zeros_like(x) for x in u]
        else:
            denom = torch._foreach_sqrt(d)
            if bias_correction and b2 > 0.0:
                torch._foreach_mul_(denom, hoist(1.0 / math.sqrt(1.0 - b2 ** k)))
            if eps:
                torch._foreach_add_(denom, eps)
            out = writable(u, extras)
            torch._foreach_div_(out, denom)                   # u / (sqrt(D-hat) + eps)
        return as_tree(updates, out), AbsHessianDiagState(t, k, d, rng_state)

    def needs_hvp(state: AbsHessianDiagState) -> bool:
        return is_hvp_step(state.count + 1, update_d_every, d_warmup)

    return GradientTransformation(init, update, needs_hvp=needs_hvp)
