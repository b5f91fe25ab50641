"""Cheap counts over a GraphModule: compute nodes, parameters, op histogram."""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

COMPUTE_OPS = ("call_function", "call_method", "call_module")


def op_name(node: fx.Node) -> str:
    """A short stable name for a node's operation, e.g. ``aten.conv2d`` or ``call_module:_guards_fn``."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
        return getattr(target, "__name__", str(target))
    if node.op == "call_module":
        return f"call_module:{node.target}"
    if node.op == "call_method":
        return f"method:{node.target}"
    return node.op


def count_compute_nodes(graph_module: fx.GraphModule) -> int:
    """Number of nodes that compute something (not inputs, outputs or attribute reads)."""
    return sum(1 for n in graph_module.graph.nodes if n.op in COMPUTE_OPS)


def count_parameters(graph_module: torch.nn.Module) -> int:
    """Elements in all parameters and floating-point buffers (the weights a file stores)."""
    total = sum(p.numel() for p in graph_module.parameters())
    total += sum(b.numel() for b in graph_module.buffers() if b.is_floating_point())
    return total


def op_histogram(graph_module: fx.GraphModule) -> Counter:
    """Count of each operation among compute nodes."""
    return Counter(op_name(n) for n in graph_module.graph.nodes if n.op in COMPUTE_OPS)
