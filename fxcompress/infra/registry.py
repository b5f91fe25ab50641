"""The registries: kebab-case names -> Pass classes, and preset names -> recipe factories.

Registration is explicit (``@register`` on the class, :func:`register_preset`) and idempotent.
``fxcompress/__init__.py`` imports ``fxcompress.passes``, whose modules register the built-in
passes and presets, so importing any part of the package fills both; this module never imports
the layers above it. A user's own passes register the same way from their package.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Mapping

from fxcompress.errors import RecipeError
from fxcompress.infra.pass_base import Pass

_REGISTRY: dict[str, type[Pass]] = {}
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9:]+)*$")


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register ``cls`` under ``cls.name`` (kebab-case). Re-registering is a no-op."""
    if not _NAME.match(cls.name or ""):
        raise ValueError(f"pass name {cls.name!r} of {cls.__name__} is not kebab-case")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name {cls.name!r} is taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted."""
    return dict(sorted(_REGISTRY.items()))


#: Preset name -> a factory returning a fresh Recipe (callers may edit what they get).
PRESETS: dict[str, Callable[[], Any]] = {}


def register_preset(name: str, factory: Callable[[], Any]) -> Callable[[], Any]:
    """Register ``factory`` (no arguments, returns a Recipe) as preset ``name``; returns ``factory``."""
    if not _NAME.match(name):
        raise ValueError(f"preset name {name!r} is not kebab-case")
    if name in _REGISTRY:
        raise ValueError(f"preset name {name!r} is taken by a pass")
    PRESETS[name] = factory
    return factory


def pass_class(name: str) -> type[Pass]:
    """The class registered as ``name``; RecipeError with close matches and the full list if none."""
    passes = available_passes()
    if name in passes:
        return passes[name]
    close = difflib.get_close_matches(name, list(passes), n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise RecipeError(
        f"Unknown pass '{name}'.",
        f"{hint}Valid passes: {', '.join(passes)} (see `fxcompress passes`).",
    )


def create_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    """Instantiate the registered pass ``name`` with validated options."""
    return pass_class(name)(options)
