"""``mechanize``: any transform or recipe under Mechanic's learned scale (ALGORITHMS.md §8.3)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from gradchain.chains.combinators import named_chain
from gradchain.core import GradientTransformation
from gradchain.transforms.mechanic import DEFAULT_BETAS, mechanic_scale

__all__ = ["mechanize"]

Recipe = Callable[..., GradientTransformation]


def mechanize(base: GradientTransformation | Recipe, *, s_decay: float = 0.01,
              betas: Sequence[float] = DEFAULT_BETAS, s_init: float | None = None,
              eps: float = 1e-8, store_delta: bool = False, variant: str = "optax",
              keep_copy: None = None) -> GradientTransformation | Recipe:
    r"""``base`` followed by ``mechanic_scale``, which learns the scale S of its steps.

    .. math::  x_{t+1} = x_{ref} + S_{t+1} \sum_{i \le t} u_i, \qquad
               u_i = \text{the step of } \texttt{base}

    ``base`` is a transform that ends with ``scale_by_learning_rate`` (η = 1.0 is a good
    choice; a schedule keeps its shape and Mechanic learns its scale): the result is
    ``named_chain(("base", base), ("mechanic", mechanic_scale(...)))``, checkpoint keys
    ``base.<...>`` and ``mechanic.x_ref``, ``mechanic.s``, ... Or ``base`` is a *recipe* (a
    function of keyword hyperparameters returning a transform, as ``chains.adamw``): the
    result is the recipe ``mechanize_<name>`` whose hyperparameters are the base recipe's, then
    Mechanic's with the values given here as defaults, so ``ChainOptimizer`` shows them as
    param-group hyperparameters. A Mechanic option whose name the base recipe already takes
    (``eps``, ``betas``) is called ``mechanic_<name>`` there.

    Options (``mechanic_scale``): ``s_decay`` 0.01, ``betas`` 1 - 10^-i (i = 1..6), ``s_init``
    None (the variant's: optax 1e-6, pytorch 1e-8), ``eps`` 1e-8, ``store_delta`` False,
    ``variant`` "optax" (``optax.contrib.mechanize``) or "pytorch" (``mechanic_pytorch``). The
    base must not be terminal (Mechanic must be last, and acts on a base step that already
    holds the learning rate). Under ``ChainOptimizer`` every param group learns its own
    scale; ``optimizers.mechanic.mechanize`` shares one over all groups, as the paper does.
    ``keep_copy``, an option of ``optimizers.mechanic.mechanize`` only, raises a TypeError
    when given: ``mechanic_scale`` reads the parameters itself and keeps no copy of them.

    Example:
        >>> from gradchain.chains import adamw
        >>> from gradchain.transforms import scale_by_learning_rate
        >>> tx = mechanize(scale_by_learning_rate(1.0))  # mechanized SGD
        >>> recipe = mechanize(adamw, s_decay=0.0)
        >>> recipe.__name__, recipe(learning_rate=1.0, mechanic_eps=1e-8).terminal
        ('mechanize_adamw', True)
    """
    if keep_copy is not None:
        raise TypeError("keep_copy is an option of mechanized optimizer classes only (it keeps "
                        "their copy of the parameters between steps); a transform's or a "
                        "recipe's mechanic_scale reads the parameters itself and keeps no copy "
                        "between steps: drop keep_copy, or mechanize a torch.optim.Optimizer "
                        "class (gradchain.mechanize(torch.optim.AdamW, keep_copy=True))")
    options = dict(s_decay=s_decay, betas=betas, s_init=s_init, eps=eps,
                   store_delta=store_delta, variant=variant)
    mechanic_scale(**options)  # validates the options now
    if isinstance(base, GradientTransformation):
        return _mechanized(base, options)
    if callable(base):
        return _mechanized_recipe(base, options)
    raise TypeError(f"mechanize takes a GradientTransformation or a recipe (a function "
                    f"returning one), got {type(base).__name__}")


def _mechanized(base: GradientTransformation, options: dict[str, Any]
                ) -> GradientTransformation:
    if base.terminal:
        raise ValueError("the base of mechanize is terminal (schedule_free, mechanic_scale, "
                         "hypergrad_lr, ...): Mechanic must be the last transform and scales "
                         "a base step that ends with scale_by_learning_rate; mechanize that "
                         "base instead")
    return named_chain(("base", base), ("mechanic", mechanic_scale(**options)))


def _mechanized_recipe(recipe: Recipe, options: dict[str, Any]) -> Recipe:
    base_signature = inspect.signature(recipe)
    taken = set(base_signature.parameters)
    names = {option: f"mechanic_{option}" if option in taken else option for option in options}
    own = [inspect.Parameter(names[option], inspect.Parameter.KEYWORD_ONLY, default=value)
           for option, value in options.items()]
    base_parameters = list(base_signature.parameters.values())
    tail = [p for p in base_parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in base_parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    signature = base_signature.replace(parameters=head + own + tail,
                                       return_annotation=GradientTransformation)

    def mechanized(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        chosen = {option: arguments.pop(names[option]) for option in options}
        base_arguments = inspect.BoundArguments(base_signature, arguments)  # type: ignore
        return _mechanized(recipe(*base_arguments.args, **base_arguments.kwargs), chosen)

    renamed = [f"``{names[o]}``" for o in options if names[o] != o]
    mechanized.__name__ = mechanized.__qualname__ = f"mechanize_{recipe.__name__}"
    mechanized.__signature__ = signature  # type: ignore[attr-defined]
    mechanized.__doc__ = (
        f"``{recipe.__name__}`` under Mechanic's learned scale (``chains.mechanic.mechanize``)."
        f"\n\nHyperparameters: those of ``{recipe.__name__}``, then Mechanic's options "
        f"{', '.join(f'``{names[o]}``' for o in options)}"
        + (f" ({', '.join(renamed)}: renamed, the base takes the plain name)" if renamed
           else "") + ". Give the base learning rate 1.0 or any value: Mechanic learns the "
        "scale.")
    return mechanized
