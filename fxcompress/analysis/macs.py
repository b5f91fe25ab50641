"""Multiply-accumulate counts from ``node.meta["val"]`` shapes.

Counted: convolutions (``out elements x in_channels/groups x kernel area``), linear layers
(``out elements x in_features``), matmul/bmm/mm (``out elements x reduction``) and scaled dot-product
attention (two matmuls). Element-wise ops, norms and pooling are left out, as in the MAC figures
published for torchvision models and by Torch-Pruning's counter, so the numbers compare.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fxcompress.analysis.shapes import tensor_shape
from fxcompress.graph_meta import layer_name

aten = torch.ops.aten

_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
          aten._convolution.default}
_GENERIC_CONVS = {aten.convolution.default, aten._convolution.default}  # (..., transposed, ...) at index 6
_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default}
_BIASED_MATMULS = {aten.addmm.default, aten.baddbmm.default}  # (bias, a, b): GPT-2's Conv1D is addmm
#: Functions with ``aten.linear``'s (input, weight[out, in], ...) signature that passes insert
#: (dynamic int8 linear): they do a linear layer's multiply-adds, in whatever precision.
_LINEAR_LIKE: set = {aten.linear.default}


def register_linear_like(function) -> None:
    """Count calls to ``function(input, weight, ...)`` as a linear layer's MACs."""
    _LINEAR_LIKE.add(function)


def node_macs(node: fx.Node) -> int:
    """MACs of one node (0 for nodes that are not counted)."""
    if node.op != "call_function":
        return 0
    out = tensor_shape(node)
    if out is None:
        return 0
    target = node.target
    if target in _CONVS:
        weight = tensor_shape(node.args[1])
        if weight is None:
            return 0
        if target in _GENERIC_CONVS and len(node.args) > 6 and node.args[6]:
            return 0  # transposed convolution: its weight is [in, out/groups, ...]; not counted rather than wrong
        # weight is [out, in/groups, *kernel]: each output element reads in/groups x kernel inputs.
        return math.prod(out) * math.prod(weight[1:])
    if target in _LINEAR_LIKE:
        weight = tensor_shape(node.args[1])
        return math.prod(out) * weight[1] if weight else 0
    if target in _MATMULS or target in _BIASED_MATMULS:
        a = tensor_shape(node.args[1 if target in _BIASED_MATMULS else 0])
        return math.prod(out) * a[-1] if a else 0
    if target is aten.scaled_dot_product_attention.default:
        q, k = tensor_shape(node.args[0]), tensor_shape(node.args[1])
        if q is None or k is None:
            return 0
        # scores = q @ k^T (L x S x E) and out = scores @ v (L x S x Ev), per batch/head.
        return math.prod(q[:-1]) * k[-2] * q[-1] + math.prod(out[:-1]) * k[-2] * out[-1]
    return 0


def count_macs(graph_module: fx.GraphModule) -> int:
    """Total MACs of one forward pass at the captured input shapes."""
    return sum(node_macs(n) for n in graph_module.graph.nodes)


def macs_by_layer(graph_module: fx.GraphModule) -> dict[str, int]:
    """MACs per counted node, keyed by the weight's owner (``layer1.0.conv1``) or the node name."""
    out: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        macs = node_macs(node)
        if not macs:
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        key = layer_name(weight, fallback="") if isinstance(weight, fx.Node) and weight.op == "get_attr" else node.name
        out[key] = out.get(key, 0) + macs
    return out
