"""Which uncertainty method scores a run: a registry the method modules fill themselves.

Each method module registers a *builder* under a name, with an optional *detector*::

    register_method("sngp", build_sngp, detect=lambda members: is_sngp_model(...))

The score and calibrate jobs ask ``choose_method`` for the method of a run and never name one:

* a name given by the caller (``ScoreOptions(method="sngp")``) picks that method;
* otherwise the detectors are asked, the latest registered first, whether the loaded models
  are theirs (several models: a deep ensemble; a model with a GP head: SNGP);
* otherwise the default, MC dropout.

A method written outside batchuq registers itself the same way, in a module that the run
imports (``batchuq score --import mymethods``): no job changes. The built-in methods are
registered the first time the registry is used; a method registered later is asked before them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchuq.defaults import (
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_METHOD,
    DEFAULT_PASSES,
    DEFAULT_PRECISION,
)
from batchuq.errors import UsageError
from batchuq.methods.base import UncertaintyMethod

if TYPE_CHECKING:
    from batchuq.models import LoadedModel


@dataclass(frozen=True)
class MethodSettings:
    """What a run's options say to the method that scores it.

    Attributes:
        passes: Samples per row (MC passes T; with ``passes="auto"``, the most an image gets).
        sample_layers: Name patterns of the dropout layers to sample (``None``: all).
        memory_budget_mb: Bound on the activations of the rows run at once.
        precision: ``float32`` or ``bfloat16`` for the sampled part of the network.
        logits: The model outputs logits: apply a softmax to every sample.
    """

    passes: int = DEFAULT_PASSES
    sample_layers: list[str] | None = None
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    precision: str = DEFAULT_PRECISION
    logits: bool = False


#: Builds a method for a run's models (one, or the members of an ensemble, in order).
MethodBuilder = Callable[[Sequence["LoadedModel"], MethodSettings], UncertaintyMethod]
#: Says whether a run's models are the method's to score when no method is named.
MethodDetector = Callable[[Sequence["LoadedModel"]], bool]


@dataclass(frozen=True)
class RegisteredMethod:
    """A method in the registry.

    Attributes:
        name: What ``ScoreOptions(method=...)`` calls it.
        build: Builds it for a run's models and settings.
        detect: Whether it scores given models when no method is named (``None``: only by
            name, or as the default).
    """

    name: str
    build: MethodBuilder
    detect: MethodDetector | None = None


# The modules of the built-in methods: each registers its method when imported.
_BUILTIN_MODULES = (
    "batchuq.methods.mc_dropout",
    "batchuq.methods.sngp",
    "batchuq.methods.ensemble",
)
_REGISTRY: dict[str, RegisteredMethod] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    """Import the built-in method modules once (they register themselves)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def register_method(
    name: str, build: MethodBuilder, detect: MethodDetector | None = None
) -> RegisteredMethod:
    """Add a method to the registry, or replace the one of that name.

    Args:
        name: The method's name (what ``ScoreOptions(method=name)`` and the metadata's
            ``method`` should say).
        build: ``build(models, settings)`` returns the method for a run's loaded models (one,
            or an ensemble's members) and its ``MethodSettings``; it raises ``UsageError`` for
            models it cannot score.
        detect: ``detect(models)`` says whether the models are this method's to score when the
            caller names no method; ``None``: only by name.

    Returns:
        The registered entry.

    Raises:
        UsageError: If ``name`` is empty or ``build`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"A method needs a name. Received: name={name!r}")
    if not callable(build) or (detect is not None and not callable(detect)):
        raise UsageError(
            f"`build` and `detect` must be callables. Received: build={build!r}, detect={detect!r}"
        )
    _load_builtins()
    entry = RegisteredMethod(name, build, detect)
    _REGISTRY.pop(name, None)  # a replaced method is asked as the latest registered
    _REGISTRY[name] = entry
    return entry


def unregister_method(name: str) -> None:
    """Remove a method from the registry (a no-op for a name not registered)."""
    _REGISTRY.pop(name, None)


def registered_methods() -> list[str]:
    """The names of the registered methods, in the order they were registered."""
    _load_builtins()
    return list(_REGISTRY)


def method_named(name: str) -> RegisteredMethod:
    """The registered method called ``name``.

    Raises:
        UsageError: If no method of that name is registered.
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise UsageError(
            f"No uncertainty method is registered as {name!r}; registered: "
            f"{', '.join(sorted(_REGISTRY))} (a method of your own registers itself with "
            f"batchuq.methods.register_method in a module the run imports). "
            f"Received: method={name!r}"
        )
    return _REGISTRY[name]


def choose_method(
    models: Sequence[LoadedModel], settings: MethodSettings, name: str | None = None
) -> UncertaintyMethod:
    """Build the method of a run: the one named, else the latest registered whose detector
    accepts the models, else MC dropout.

    Args:
        models: The run's loaded models (one, or an ensemble's members, in order).
        settings: What the run's options say to the method.
        name: A registered method's name, or ``None`` to detect it.

    Returns:
        The method, built.

    Raises:
        UsageError: If ``name`` is not registered, or the method cannot score the models.
    """
    if name is not None:
        return method_named(name).build(models, settings)
    _load_builtins()
    for entry in reversed(_REGISTRY.values()):
        if entry.detect is not None and entry.detect(models):
            return entry.build(models, settings)
    return method_named(DEFAULT_METHOD).build(models, settings)
