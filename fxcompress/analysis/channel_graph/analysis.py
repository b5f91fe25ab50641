"""The channel analysis: the walk and its op handlers put together, and which handler reads which op."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from fxcompress.analysis.channel_graph.layers import LayerOps
from fxcompress.analysis.channel_graph.model import ChannelGraph
from fxcompress.analysis.channel_graph.ops import _BINARY, _CONVS, _POOLS, _REDUCTIONS, _RESHAPES, _SPLITS, _UNARY
from fxcompress.analysis.channel_graph.shape_ops import ShapeOps
from fxcompress.analysis.channel_graph.values import ValueOps
from fxcompress.analysis.channel_graph.walk import Walk

aten = torch.ops.aten


class ChannelAnalysis(Walk, LayerOps, ShapeOps, ValueOps):
    """One topological walk over the graph with every op handler (see the package docstring)."""

    def handler(self, target: Any) -> Callable[[Any, fx.Node], None] | None:
        handler = _HANDLERS.get(target)
        if handler is None:
            handler = next((h for group, h in _GROUP_HANDLERS if target in group), None)
        return handler


_HANDLERS: dict[Any, Any] = {
    aten.linear.default: ChannelAnalysis.linear,
    aten.embedding.default: ChannelAnalysis.embedding,
    aten.batch_norm.default: ChannelAnalysis.batch_norm,
    aten.layer_norm.default: ChannelAnalysis.layer_norm,
    aten.rms_norm.default: ChannelAnalysis.layer_norm,
    aten.permute.default: ChannelAnalysis.permute,
    aten.transpose.int: ChannelAnalysis.permute,
    aten.swapaxes.default: ChannelAnalysis.permute,
    aten.pad.default: ChannelAnalysis.pad,
    aten.constant_pad_nd.default: ChannelAnalysis.pad,
    aten.roll.default: ChannelAnalysis.roll,
    aten.t.default: ChannelAnalysis.permute,
    aten.expand.default: ChannelAnalysis.expand,
    aten.select.int: ChannelAnalysis.select,
    aten.slice.Tensor: ChannelAnalysis.slice,
    aten.cat.default: ChannelAnalysis.cat,
    aten.matmul.default: ChannelAnalysis.matmul,
    aten.mm.default: ChannelAnalysis.matmul,
    aten.bmm.default: ChannelAnalysis.matmul,
    aten.softmax.int: ChannelAnalysis.softmax,
    aten._softmax.default: ChannelAnalysis.softmax,
    aten.log_softmax.int: ChannelAnalysis.softmax,
}
_GROUP_HANDLERS = [
    (_CONVS, ChannelAnalysis.conv),
    (_UNARY, ChannelAnalysis.unary),
    (_BINARY, ChannelAnalysis.binary),
    (_POOLS, ChannelAnalysis.pool),
    (_REDUCTIONS, ChannelAnalysis.reduction),
    (_RESHAPES, ChannelAnalysis.reshape),
    (_SPLITS, ChannelAnalysis.split),
]


def build_channel_graph(graph_module: fx.GraphModule) -> ChannelGraph:
    """Analyse ``graph_module`` (ATen dialect with ``meta["val"]``) into a :class:`ChannelGraph`."""
    return ChannelAnalysis(graph_module).run()
