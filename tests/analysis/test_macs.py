"""analysis.macs is the one MAC counter (pruning stats, per-layer reports and graph snapshots)."""

from __future__ import annotations

import torch
from torch import fx

from fxcompress.analysis.macs import node_macs

aten = torch.ops.aten


def _convolution(transposed: bool, x: tuple, w: tuple, out: tuple) -> fx.Node:
    graph = fx.Graph()
    xn, wn = graph.placeholder("x"), graph.placeholder("w")
    node = graph.call_function(aten.convolution.default, (xn, wn, None, [1, 1], [0, 0], [1, 1], transposed, [0, 0], 1))
    for n, shape in ((xn, x), (wn, w), (node, out)):
        n.meta["val"] = torch.empty(shape)
    return node


def test_generic_convolution_is_counted_and_transposed_is_not():
    assert node_macs(_convolution(False, (1, 4, 5, 5), (2, 4, 3, 3), (1, 2, 3, 3))) == (2 * 3 * 3) * (4 * 3 * 3)
    # a transposed weight is [in, out/groups, k...]: the conv formula would be wrong, so it is not counted
    assert node_macs(_convolution(True, (1, 4, 5, 5), (4, 2, 3, 3), (1, 2, 7, 7))) == 0
