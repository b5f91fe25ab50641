"""Channel dependency analysis for structured pruning, as an explicit networkx graph.

Parts: :mod:`.model` (what is found), :mod:`.walk` (the walk and unification), the op handlers in
:mod:`.layers`, :mod:`.shape_ops` and :mod:`.values` (op tables in :mod:`.ops`), put together in
:mod:`.analysis`.

Removing output channel ``c`` of a convolution is only safe if the same channel is removed at
once from every tensor that indexes it: the batch norm after it, the next convolution's input
channels, the other branch of a residual add, the slice of a concatenation that holds it, the
``c * H * W`` block of a linear layer after a flatten. This module finds those couplings.

Model
-----
A **channel space** is an index set created by a producer (the output channels of a conv or
linear layer, the embedding width of an embedding table). Every tracked tensor dimension has a
**layout**: a tuple of :class:`Segment` (space, channels, inner block), read left to right, so
a concatenation is several segments and a flatten of ``[N, C, H, W]`` is one segment of ``C``
channels each ``H * W`` elements wide. Walking the graph once in topological order, each op maps
its inputs' layouts to its output's; where an op forces two layouts to be the same index set
(both sides of an add, a batch norm's parameters, a linear weight's input dimension) the spaces
are joined by an edge of :attr:`ChannelGraph.graph`. The connected components of that graph are
the **groups** that must be pruned together.

A group is refused, with a reason, when any of its channels reaches the model's output (output
shapes never change), feeds an op the analysis does not understand, is split by a reshape (e.g.
attention heads), selected or sliced individually, used by a non-depthwise grouped convolution,
or meets a computed tensor it cannot be sliced together with. Everything else may be pruned; the
parameters and size arguments that must change are listed per group.
"""

from fxcompress.analysis.channel_graph.analysis import build_channel_graph
from fxcompress.analysis.channel_graph.model import (
    ChannelGraph, ChannelGroup, ChannelSpace, Layout, ParamDim, Segment, SizeArg, keep_indices, layout_length,
    pruned_length,
)

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelSpace", "Layout", "ParamDim", "Segment", "SizeArg",
           "build_channel_graph", "keep_indices", "layout_length", "pruned_length"]
