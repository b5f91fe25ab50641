"""mark-fused-activations: annotate conv/linear + activation pairs as one unit (the graph is unchanged).

ONNX Runtime runs a conv or linear layer and the activation that alone reads it as one kernel;
quantization must not put Q/DQ between them. This pass marks such pairs in ``node.meta``
(``FUSED_ACTIVATION`` / ``FUSED_INTO``, keys of ``fxcompress.graph_meta``), removes marks a later
rewrite made stale, and reports a layer whose output is read elsewhere as a near-miss.
"""

from __future__ import annotations

import torch
from torch import fx

from fxcompress.graph_meta import FUSED_ACTIVATION, FUSED_INTO
from fxcompress.infra.pass_base import Pass, PassResult, Rejection
from fxcompress.infra.registry import register
from fxcompress.rewrite import other_users, weighted_layer

aten = torch.ops.aten


def _activation_targets() -> frozenset:
    names = ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "gelu_", "silu", "silu_", "sigmoid",
             "sigmoid_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "tanh", "tanh_", "leaky_relu",
             "leaky_relu_", "elu", "elu_", "mish", "mish_", "clamp", "clamp_", "clamp_min", "clamp_min_")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


ACTIVATIONS = _activation_targets()


def _is_unit(layer: fx.Node | None, activation: fx.Node | None) -> bool:
    """True if ``activation`` is an activation reading ``layer``, a conv/linear with no other user."""
    return (
        layer is not None and activation is not None and weighted_layer(layer) is not None
        and activation.op == "call_function" and activation.target in ACTIVATIONS
        and bool(activation.args) and activation.args[0] is layer and list(layer.users) == [activation]
    )


@register
class MarkFusedActivationsPass(Pass):
    """Annotate conv/linear + activation pairs as one unit; the graph itself is unchanged.

    Sets ``meta[FUSED_ACTIVATION] = <activation name>`` on the layer and
    ``meta[FUSED_INTO] = <layer name>`` on the activation, so quantization places no
    Q/DQ between them (ONNX Runtime runs such pairs as one kernel). Marks whose pair no longer
    holds (a later rewrite changed it) are removed.
    """

    name = "mark-fused-activations"
    lossless = True

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in graph_module.graph.nodes}
        cleared = 0
        for node in graph_module.graph.nodes:  # drop stale marks first
            act = node.meta.get(FUSED_ACTIVATION)
            if act is not None and not _is_unit(node, nodes.get(act)):
                del node.meta[FUSED_ACTIVATION]
                cleared += 1
            into = node.meta.get(FUSED_INTO)
            if into is not None and not _is_unit(nodes.get(into), node):
                del node.meta[FUSED_INTO]
                cleared += 1
        marked = 0
        rejections: list[Rejection] = []
        for act in graph_module.graph.nodes:
            if act.op != "call_function" or act.target not in ACTIVATIONS or not act.args:
                continue
            layer = weighted_layer(act.args[0])
            if layer is None:
                continue
            reason = other_users(layer.node, act, "the activation cannot run inside the layer")
            if reason:
                rejections.append(Rejection("layer-activation", act.name, reason))
                continue
            if layer.node.meta.get(FUSED_ACTIVATION) == act.name and act.meta.get(FUSED_INTO) == layer.node.name:
                continue
            layer.node.meta[FUSED_ACTIVATION] = act.name
            act.meta[FUSED_INTO] = layer.node.name
            marked += 1
        modified = bool(marked or cleared)
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified, {"marked": marked, "stale_cleared": cleared}, rejections)
