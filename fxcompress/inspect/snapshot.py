"""A lightweight, picklable picture of a GraphModule at one moment of a compile run.

Snapshots are what the RecordDiff instrument keeps after every pass; diffs between any two of
them are computed later, so recording stays cheap and no GraphModule copies are held.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from fxcompress.analysis.graph_stats import COMPUTE_OPS, count_parameters, op_name


@dataclass(frozen=True)
class NodeInfo:
    """One node: its name, operation, inputs, result type and the layer it came from."""

    name: str
    op: str
    operation: str
    inputs: tuple[str, ...]
    shape: tuple[int, ...] | None
    dtype: str | None
    layer: str


def node_layer(node: fx.Node) -> str:
    """The dotted module path that produced ``node`` (``layer1.0.bn1``), or '' for top-level code."""
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "")
    provenance = node.meta.get("fxcompress_layer")
    return provenance or ""


def _type_of(node: fx.Node) -> tuple[tuple[int, ...] | None, str | None]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            shape = tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic sizes
            shape = tuple(-1 for _ in val.shape)
        return shape, str(val.dtype).replace("torch.", "")
    return None, None


@dataclass
class GraphSnapshot:
    """Nodes (in graph order), parameter count and op histogram of one graph state."""

    label: str
    nodes: list[NodeInfo] = field(default_factory=list)
    parameters: int = 0

    @classmethod
    def of(cls, graph_module: fx.GraphModule, label: str) -> "GraphSnapshot":
        nodes = []
        for n in graph_module.graph.nodes:
            shape, dtype = _type_of(n)
            inputs = tuple(a.name for a in n.all_input_nodes)
            nodes.append(NodeInfo(n.name, n.op, op_name(n), inputs, shape, dtype, node_layer(n)))
        return cls(label, nodes, count_parameters(graph_module))

    @property
    def compute_nodes(self) -> list[NodeInfo]:
        return [n for n in self.nodes if n.op in COMPUTE_OPS]

    def histogram(self) -> Counter:
        return Counter(n.operation for n in self.compute_nodes)
