"""eliminate-common-subexpressions: two pure ops with the same target and the same inputs compute
the same value, so the later one is replaced by the earlier (lossless).

Purity comes from :func:`~fxcompress.analysis.aliasing.is_pure_call`; aliasing rules keep apart
what an in-place op could make differ (see the pass docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.analysis.aliasing import is_pure_call, may_be_mutated
from fxcompress.infra.pass_base import Pass, PassResult, option
from fxcompress.infra.registry import register

aten = torch.ops.aten

_COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}


def _normalize(value: Any) -> Any:
    """A hashable key for an argument; types are kept (1, 1.0 and True give different dtypes)."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_normalize(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _normalize(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", repr(value))  # keeps -0.0 apart from 0.0 and makes nan equal to nan
    return (type(value).__name__, value)


@dataclass(frozen=True)
class EliminateCommonSubexpressionsOptions:
    commutative: bool = option(True, "treat add(a, b) and add(b, a) (also mul) as the same expression")


@register
class EliminateCommonSubexpressionsPass(Pass):
    """Merge identical pure ops on identical inputs (and repeated reads of one attribute).

    Never merged: in-place ops, asserts, random ops, uninitialised factories, results some
    in-place op may write later, and ops reading a tensor that is written in place anywhere
    (two reads around the write would see different values).
    """

    name = "eliminate-common-subexpressions"
    Options = EliminateCommonSubexpressionsOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        written: dict[fx.Node, bool] = {}

        def is_written(n: fx.Node) -> bool:
            if n not in written:
                written[n] = may_be_mutated(n)
            return written[n]

        seen: dict[Any, fx.Node] = {}
        merged = 0
        for node in list(graph.nodes):
            if node.op == "get_attr":
                key: Any = ("get_attr", node.target)
            elif is_pure_call(node) and not is_written(node) and not any(is_written(i) for i in node.all_input_nodes):
                args = node.args
                if self.options.commutative and node.target in _COMMUTATIVE and len(args) == 2 and \
                        all(isinstance(a, fx.Node) for a in args) and not node.kwargs:
                    args = tuple(sorted(args, key=order.__getitem__))
                key = (node.target, _normalize(args), _normalize(node.kwargs))
            else:
                continue
            try:
                earlier = seen.setdefault(key, node)
            except TypeError:  # an unhashable literal argument: leave the node alone
                continue
            if earlier is not node:
                node.replace_all_uses_with(earlier)
                graph.erase_node(node)
                merged += 1
        return PassResult(graph_module, bool(merged), {"merged": merged})
