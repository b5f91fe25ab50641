"""The pass registry: kebab-case names -> Pass classes.

Registration is explicit (``@register`` on the class) and idempotent; the pass modules are
imported by ``fxcompress.passes`` so that importing the package fills the registry.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Mapping

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


def _load_builtin_passes() -> None:
    import fxcompress.passes  # noqa: F401 - importing registers the built-in passes


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


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
