"""Cheap counts over a GraphModule: compute nodes, parameters, op histogram."""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from fxcompress.analysis.attributes import attribute

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


def count_parameters(module: torch.nn.Module) -> int:
    """Elements in the parameters and floating-point buffers a model stores (what a file holds).

    For a GraphModule only the tensors its graph still reads count: a rewrite leaves the replaced
    parameters attached until dead-code elimination drops them, and counting those would make
    a fold look like it doubled the model.
    """
    if not isinstance(module, fx.GraphModule):
        tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
        return sum(t.numel() for t in tensors)
    total, seen = 0, set()
    for node in module.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        tensor = attribute(module, str(node.target))
        if isinstance(tensor, torch.nn.Parameter) or (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            total += tensor.numel()
    return total


def op_histogram(graph_module: fx.GraphModule) -> Counter:
    """Count of each operation among compute nodes."""
    return Counter(op_name(n) for n in graph_module.graph.nodes if n.op in COMPUTE_OPS)
