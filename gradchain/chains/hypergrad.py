r"""AdaTune's hypergradient learning rates as recipes: HD-SGD, HD-Adam, RTHO and MARTHE
(ALGORITHMS.md §7, §8.4).

Member names are checkpoint keys (``"hypergrad.lr"``, the learned learning rate), so they are
part of each recipe's contract. ``transforms.hypergrad.hypergrad_lr_value(state)`` reads the
current learning rate from a recipe's state.
"""

from __future__ import annotations

import math

from gradchain.chains.combinators import named_chain
from gradchain.core import GradientTransformation, Schedule
from gradchain.transforms.adaptive import scale_by_adam
from gradchain.transforms.basic import add_decayed_weights
from gradchain.transforms.hypergrad import hypergrad_lr
from gradchain.transforms.momentum import trace

__all__ = ["hd_sgd", "hd_adam", "rtho", "marthe"]


def hd_sgd(learning_rate: float, hyper_lr: float = 1e-6, momentum: float = 0.0,
           nesterov: bool = False, weight_decay: float = 0.0) -> GradientTransformation:
    r"""HD-SGD (Baydin et al., 2018; AdaTune's ``SGDHD``): SGD whose learning rate follows the
    hypergradient of the next training loss.

    .. math::
        d_t = g_t + \lambda x_t, \quad b_t = m b_{t-1} + d_t, \quad
        u_t = b_t \text{ (or } d_t + m b_t\text{)}, \\
        \eta_t = \eta_{t-1} + \beta \langle d_t, u_{t-1}\rangle, \quad
        x_{t+1} = x_t - \eta_t u_t

    with :math:`u_0 = 0` (so :math:`\eta_1 = \eta_0`), one global dot product per step and
    parameter group, L2 weight decay inside the gradient (as ``torch.optim.SGD``) and PyTorch's
    momentum (none kept when m = 0). Defaults: hyper_lr β = 1e-6, momentum 0, weight_decay 0.
    AdaTune's baselines script uses lr 0.01, weight_decay 5e-4, hyper_lr 1e-8. Members:
    ``weight_decay``, ``momentum`` (when m > 0), ``hypergrad`` (``lr``, ``hyper_lr``,
    ``prev_update``, ``count``).

    Example:
        >>> tx = hd_sgd(0.1, hyper_lr=0.01)
        >>> x = [torch.tensor([1.0])]                          # f = x^2
        >>> state = tx.init(x)
        >>> for _ in range(2):
        ...     out, state = tx.update([2 * x[0]], state, x)
        ...     x = [x[0] + out[0]]
        >>> x                                                  # 0.8, then 0.8 - 0.132 * 1.6
        [tensor([0.5888])]
    """
    if nesterov and not momentum > 0:
        raise ValueError("nesterov=True needs momentum > 0")
    members = [("weight_decay", add_decayed_weights(weight_decay))]
    if momentum != 0:
        members.append(("momentum", trace(momentum, nesterov)))
    members.append(("hypergrad", hypergrad_lr("hd", learning_rate, hyper_lr,
                                              weight_decay=weight_decay)))
    return named_chain(*members)


def _uncorrected_root_eps(eps: float, b2: float) -> Schedule:
    r"""The eps that makes ``scale_by_adam`` (eps added to :math:`\sqrt{\hat v}`) add
    :math:`\epsilon` to the uncorrected :math:`\sqrt{v}` instead, as AdamHD does:
    :math:`\epsilon / \sqrt{1 - \beta_2^t}`, t = count + 1."""

    def eps_at(count: int) -> float:
        return eps / math.sqrt(1.0 - b2 ** (count + 1))

    return eps_at


def hd_adam(learning_rate: float = 1e-3, hyper_lr: float = 1e-8, b1: float = 0.9,
            b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
            ) -> GradientTransformation:
    r"""HD-Adam (Baydin et al., 2018; AdaTune's ``AdamHD``): Adam whose learning rate follows
    the hypergradient of the next training loss.

    .. math::
        d_t = g_t + \lambda x_t, \quad
        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}, \quad
        \eta_t = \eta_{t-1} + \beta \langle d_t, u_{t-1}\rangle, \quad
        x_{t+1} = x_t - \eta_t u_t

    Adam in AdamHD's eps convention, eps added to the uncorrected :math:`\sqrt{v}` (the
    "torch-Adam eps convention" of ALGORITHMS.md §0.6, from PyTorch's Adam of the time; today's
    ``torch.optim.Adam`` adds it to :math:`\sqrt{\hat v}`, as ``scale_by_adam`` does): here
    ``scale_by_adam`` with eps scheduled as :math:`\epsilon/\sqrt{1-\beta_2^t}`. With
    L2 weight decay, :math:`u_0 = 0`, and one global h per step and parameter group
    (AdamHD moves the lr tensor by tensor within a step; ALGORITHMS.md §10 row 31). Defaults:
    lr 1e-3, hyper_lr 1e-8, betas (0.9, 0.999), eps 1e-8 (AdaTune's scripts: 1e-4). Members:
    ``weight_decay``, ``adam`` (``mu``, ``nu``, ``count``), ``hypergrad`` (``lr``, ``hyper_lr``, ``prev_update``, ``count``).

    Example:
        >>> tx = hd_adam(1e-3, hyper_lr=1e-8, weight_decay=5e-4)
        >>> x = [torch.tensor([1.0, -2.0])]
        >>> out, state = tx.update([x[0].clone()], tx.init(x), x)
        >>> out  # first step: -lr * sign(g) (eps aside)
        [tensor([-0.0010,  0.0010])]
    """
    return named_chain(
        ("weight_decay", add_decayed_weights(weight_decay)),
        ("adam", scale_by_adam(b1=b1, b2=b2, eps=_uncorrected_root_eps(eps, b2))),
        ("hypergrad", hypergrad_lr("hd", learning_rate, hyper_lr, weight_decay=weight_decay)),
    )


def marthe(learning_rate: float, hyper_lr: float = 1e-8, mu: float | str = 0.99999,
           alpha: float = 1e-6, grad_clip: float | None = 100.0, dynamics: str = "sgd_momentum",
           momentum: float = 0.9, nesterov: bool = False, b1: float = 0.9, b2: float = 0.999,
           eps: float = 1e-8, weight_decay: float = 0.0, first_order: bool = False,
           lr_in_jacobian: str = "current", min_lr: float | None = None,
           clip_training_grad: bool = False) -> GradientTransformation:
    r"""MARTHE (Donini et al., 2020): the learning rate follows the hypergradient of a
    validation loss through a discounted tangent of the trajectory.

    .. math::
        Z_{t+1} = \mu A_t Z_t + B_t, \quad h_t = \langle \nabla E(x_t), Z^x_t\rangle, \quad
        \eta \leftarrow \eta - \beta h_t, \quad \beta \leftarrow \max(\beta + \alpha h_t \eta, 0)

    The training dynamics (``dynamics``: ``"sgd"``, ``"sgd_momentum"`` or ``"adam"``, L2 weight
    decay) run inside ``hypergrad_lr(mode="marthe")``, which documents the exact tangents. μ in
    [0, 1) is a fixed discount (AdaTune suggests 0.99-0.999), 1 is RTHO (``rtho``), 0 a
    one-step hypergradient (HD with the validation gradient); μ in (-1, 0) or "auto" adapts it.
    α = 0 freezes β. Extras: ``val_grads`` from the second call on, ``hvp`` when μ > 0 and not
    ``first_order`` (``needs_hvp``). Defaults are AdaTune's command line: hyper_lr 1e-8, mu
    0.99999, alpha 1e-6, grad_clip 100, dynamics "sgd_momentum" with momentum 0.9 (the CLI
    also sets weight_decay 5e-4, lr 0.01, and eps 1e-4 for Adam). Member: ``hypergrad`` (``lr``,
    ``hyper_lr``, ``mu``, ``mu_acc``, ``tangent.*``, ``dynamics.*``, ``count``).

    Example:
        >>> tx = marthe(0.01, weight_decay=5e-4)
        >>> x = [torch.tensor([1.0, -2.0])]                   # f = |x|^2 / 2: g = x, H = I
        >>> state = tx.init(x)
        >>> out, state = tx.update([x[0].clone()], state, x)  # first call: no val_grads
        >>> out, state = tx.update([x[0].clone()], state, x, hvp=lambda v: v,
        ...                        val_grads=[x[0].clone()])
    """
    return named_chain(("hypergrad", hypergrad_lr(
        "marthe", learning_rate, hyper_lr, mu=mu, alpha=alpha, grad_clip=grad_clip,
        first_order=first_order, dynamics=dynamics, momentum=momentum, nesterov=nesterov, b1=b1,
        b2=b2, eps=eps, weight_decay=weight_decay, lr_in_jacobian=lr_in_jacobian,
        min_lr=min_lr, clip_training_grad=clip_training_grad)))


def rtho(learning_rate: float, hyper_lr: float = 1e-8, dynamics: str = "sgd_momentum",
         momentum: float = 0.9, nesterov: bool = False, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, weight_decay: float = 0.0, alpha: float = 0.0,
         grad_clip: float | None = 100.0, lr_in_jacobian: str = "current",
         min_lr: float | None = None, clip_training_grad: bool = False
         ) -> GradientTransformation:
    r"""RTHO (Franceschi et al., 2017): real-time hyperparameter optimization of the learning
    rate, the exact forward-mode hypergradient (``marthe`` with μ = 1).

    .. math::
        Z_{t+1} = A_t Z_t + B_t = \frac{\partial s_{t+1}}{\partial \eta}, \quad
        \eta \leftarrow \eta - \beta \langle \nabla E(x_t), Z^x_t\rangle

    Needs the ``hvp`` extra from the second call on and ``val_grads``. Z can grow without bound
    on long runs (the instability MARTHE's μ < 1 controls), hence grad_clip = 100 by default.
    Defaults as ``marthe`` but α = 0 (a fixed β). Member: ``hypergrad``.

    Example:
        >>> tx = rtho(0.01, hyper_lr=1e-6, dynamics="sgd")
        >>> tx.needs_hvp(tx.init([torch.zeros(2)]))  # the first tangent needs no product
        False
    """
    return marthe(learning_rate, hyper_lr, mu=1.0, alpha=alpha, grad_clip=grad_clip,
                  dynamics=dynamics, momentum=momentum, nesterov=nesterov, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay, lr_in_jacobian=lr_in_jacobian, min_lr=min_lr,
                  clip_training_grad=clip_training_grad)
