"""ATen node arguments by schema name.

Export writes some arguments positionally, some as keywords, and leaves defaults out; reading
them by name through the operator's schema gives the same answer for all three spellings. This
is the one reader of node arguments: ``fxcompress.rewrite`` re-exports it for rules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx


def _schema_arguments(node: fx.Node) -> list:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"node '{node.name}' does not call an ATen operator")
    return list(target._schema.arguments)


def has_argument(node: fx.Node, name: str) -> bool:
    """True if ``node`` calls an ATen operator whose schema has an argument ``name``."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(a.name == name for a in target._schema.arguments)


def argument(node: fx.Node, name: str) -> Any:
    """The value of ``node``'s argument ``name``, positional, keyword or the schema's default."""
    for i, arg in enumerate(_schema_arguments(node)):
        if arg.name != name:
            continue
        if i < len(node.args) and not arg.kwarg_only:
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        return arg.default_value if arg.has_default_value() else None
    raise KeyError(f"{node.target} has no argument '{name}'")


def set_argument(node: fx.Node, name: str, value: Any) -> None:
    """Set ``node``'s argument ``name``, extending the positional arguments with defaults if needed."""
    schema_args = _schema_arguments(node)
    for i, arg in enumerate(schema_args):
        if arg.name != name:
            continue
        if arg.kwarg_only or name in node.kwargs:
            node.kwargs = {**node.kwargs, name: value}
            return
        args = list(node.args)
        while len(args) <= i:  # the skipped positions take their schema defaults
            args.append(schema_args[len(args)].default_value)
        args[i] = value
        node.args = tuple(args)
        return
    raise KeyError(f"{node.target} has no argument '{name}'")
