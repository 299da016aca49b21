"""Public names document themselves: every function and class in a module's ``__all__`` has a
docstring with an example (run by ``--doctest-modules``), and every transform factory and recipe
states its defaults."""

import importlib
import inspect
import pkgutil

import gradchain
import gradchain.chains
import gradchain.transforms


def _public_definitions() -> list[tuple[str, object]]:
    """``("module.name", object)`` for every function or class in a module's ``__all__`` that
    the module defines itself (a re-export is checked where it is defined)."""
    found = []
    for info in pkgutil.walk_packages(gradchain.__path__, "gradchain."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and \
                    obj.__module__ == module.__name__:
                found.append((f"{module.__name__}.{name}", obj))
    return found


def test_every_public_function_and_class_has_a_docstring_with_an_example():
    found = dict(_public_definitions())
    # the walk reaches every layer (a broken walk would check nothing)
    for name in ("gradchain.core.leaves", "gradchain.transforms.adaptive.scale_by_adam",
                 "gradchain.transforms.soap.SoapState", "gradchain.chains.recipes.adamw",
                 "gradchain.optimizers.adapter.ChainOptimizer", "gradchain.tasks.charlm.train",
                 "gradchain.cli.plot_comparison"):
        assert name in found
    # __doc__, not inspect.getdoc: a class's own docstring, never one inherited from a base (a
    # NamedTuple without one has an automatic "Name(fields)", which has no example)
    missing = [name for name, obj in found.items() if ">>>" not in (obj.__doc__ or "")]
    assert not missing, f"no docstring with a '>>>' example: {', '.join(missing)}"


def _states_defaults(factory: object) -> bool:
    """Whether the docstring names its defaults: the word, or every default value."""
    doc = factory.__doc__ or ""
    defaults = [p.default for p in inspect.signature(factory).parameters.values()
                if p.default is not inspect.Parameter.empty]
    return "default" in doc.lower() or all(repr(d) in doc or str(d) in doc for d in defaults)


def test_every_transform_factory_and_recipe_states_its_defaults():
    factories = {f"{package.__name__}.{name}": getattr(package, name)
                 for package in (gradchain.transforms, gradchain.chains)
                 for name in package.__all__ if inspect.isfunction(getattr(package, name))}
    assert "gradchain.transforms.scale_by_adam" in factories
    assert "gradchain.chains.adamw" in factories
    silent = [name for name, factory in factories.items() if not _states_defaults(factory)]
    assert not silent, f"the docstring does not state the defaults: {', '.join(silent)}"
