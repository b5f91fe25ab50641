"""A lightweight, picklable picture of a GraphModule at one moment of a compile run.

Snapshots are what the RecordDiff instrument keeps after every pass; diffs between any two of
them are computed later, so recording stays cheap and no GraphModule copies are held. Besides
names, operations and types, a snapshot keeps what a diff needs to explain a change: the layer a
node came from, the provenance a pass stamped on nodes it created, multiply-accumulates of
conv/linear/matmul nodes, a precision label and any ``fxcompress_*`` annotations.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx

from fxcompress.analysis.graph_stats import COMPUTE_OPS, count_parameters, op_name
from fxcompress.analysis.macs import node_macs
from fxcompress.graph_meta import LAYER_KEY, PRECISION_KEY, PROVENANCE_KEY, is_own_key, layer_name

#: Meta keys that are not annotations (they are read into their own fields).
_OWN_KEYS = {PROVENANCE_KEY, LAYER_KEY, PRECISION_KEY}


@dataclass(frozen=True)
class NodeInfo:
    """One node: name, operation, inputs, result type, layer, and what passes said about it.

    ``provenance`` is ``(pass, (replaced node names...))`` for nodes a pass created; ``macs`` the
    multiply-accumulates of one call (:func:`fxcompress.analysis.macs.node_macs`); ``numel`` the element
    count of a floating-point attribute (parameter) for ``get_attr`` nodes; ``precision`` the
    numeric format the node computes in (``float32``, ``int8 (fake-quant)``...); ``annotations``
    the ``fxcompress_*`` meta entries passes set (e.g. a fused activation).
    """

    name: str
    op: str
    operation: str
    inputs: tuple[str, ...]
    shape: tuple[int, ...] | None
    dtype: str | None
    layer: str
    provenance: tuple[str, tuple[str, ...]] | None = None
    macs: int = 0
    numel: int = 0
    target: str = ""
    precision: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """``name (operation)`` with the type, e.g. ``conv2d (aten.conv2d) float32[1, 8, 4, 4]``."""
        kind = f" {self.precision or self.dtype}{list(self.shape)}" if self.shape is not None else ""
        return f"{self.name} ({self.operation}){kind}"


def _type_of(node: fx.Node) -> tuple[tuple[int, ...] | None, str | None]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            shape = tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic sizes
            shape = tuple(-1 for _ in val.shape)
        return shape, str(val.dtype).replace("torch.", "")
    return None, None


def _product(shape: tuple[int, ...] | None) -> int:
    # Symbolic dimensions are recorded as -1; a MAC count over them would be meaningless.
    return math.prod(shape) if shape and all(s >= 0 for s in shape) else 0


def _is_fake_quant(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and "quantize" in op_name(node)


def node_precision(node: fx.Node, dtype: str | None) -> str | None:
    """The numeric format of a node: an explicit ``PRECISION_KEY``, int8 when it is a
    fake-quantize op or a conv/linear/matmul fed by one (what ONNX Runtime runs as an int8
    kernel), else its dtype."""
    explicit = node.meta.get(PRECISION_KEY)
    if explicit:
        return str(explicit)
    if _is_fake_quant(node):
        return "int8 (fake-quant)"
    if node_macs(node) and any(_is_fake_quant(a) for a in node.all_input_nodes):
        return "int8 (q/dq)"
    return dtype


def _provenance(node: fx.Node) -> tuple[str, tuple[str, ...]] | None:
    value = node.meta.get(PROVENANCE_KEY)
    if not isinstance(value, dict):
        return None
    sources = value.get("from") or ()
    if isinstance(sources, str):
        sources = (sources,)
    return str(value.get("pass", "")), tuple(str(s.name if isinstance(s, fx.Node) else s) for s in sources)


def _annotations(node: fx.Node) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted((k, str(v)) for k, v in node.meta.items() if is_own_key(k) and k not in _OWN_KEYS)
    )


def node_info(node: fx.Node) -> NodeInfo:
    """The :class:`NodeInfo` of one fx node."""
    shape, dtype = _type_of(node)
    numel = _product(shape) if node.op == "get_attr" and dtype and ("float" in dtype or "bfloat" in dtype) else 0
    return NodeInfo(
        name=node.name,
        op=node.op,
        operation=op_name(node),
        inputs=tuple(a.name for a in node.all_input_nodes),
        shape=shape,
        dtype=dtype,
        layer=layer_name(node, fallback=""),
        provenance=_provenance(node),
        macs=node_macs(node),
        numel=numel,
        target=str(node.target) if node.op in ("get_attr", "placeholder") else "",
        precision=node_precision(node, dtype),
        annotations=_annotations(node),
    )


@dataclass
class GraphSnapshot:
    """Nodes (in graph order), parameter count and op histogram of one graph state."""

    label: str
    nodes: list[NodeInfo] = field(default_factory=list)
    parameters: int = 0

    @classmethod
    def of(cls, graph_module: fx.GraphModule, label: str) -> "GraphSnapshot":
        """Snapshot ``graph_module`` now, under ``label`` (a pass name or 'captured')."""
        return cls(label, [node_info(n) for n in graph_module.graph.nodes], count_parameters(graph_module))

    @property
    def compute_nodes(self) -> list[NodeInfo]:
        return [n for n in self.nodes if n.op in COMPUTE_OPS]

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward call (conv, linear and matmul nodes)."""
        return sum(n.macs for n in self.nodes)

    def histogram(self) -> Counter:
        return Counter(n.operation for n in self.compute_nodes)

    def layer_totals(self) -> dict[str, dict[str, int]]:
        """Per layer: parameters (elements of floating attributes it reads) and MACs."""
        return layer_totals(self.nodes)


def layer_totals(nodes: list[NodeInfo]) -> dict[str, dict[str, int]]:
    """Per layer of ``nodes``: parameters (floating attribute elements) and MACs."""
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "macs": 0})
    for n in nodes:
        if n.numel:
            totals[n.layer]["params"] += n.numel
        if n.macs:
            totals[n.layer]["macs"] += n.macs
    return dict(totals)
