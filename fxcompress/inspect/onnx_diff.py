"""Differences between two ONNX models: op counts, added/removed/rewired nodes, types, weights.

Nodes are aligned (:mod:`fxcompress.analysis.align`) by node name, then by shared output tensor
names, then by structure: same op on aligned producers, and finally same op with the same
networkx Weisfeiler-Lehman hash of its neighbourhood (so a re-exported model whose node names all
changed still lines up). Op-count changes come straight from the two graphs' node lists, so a
user can check them by hand with ``collections.Counter(n.op_type for n in model.graph.node)``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import onnx

from fxcompress.analysis.align import Item, align
from fxcompress.analysis.model_diff import ModelDiff
from fxcompress.inspect.onnx_graph import OnnxGraph, OnnxNode, read_model


@dataclass
class OnnxDiff(ModelDiff):
    """What changed from the ``before`` model to the ``after`` model (the shared record:
    :class:`~fxcompress.analysis.model_diff.ModelDiff`), plus the two files' sizes in bytes."""

    added: list[OnnxNode] = field(default_factory=list)
    removed: list[OnnxNode] = field(default_factory=list)
    rewired: list[tuple[OnnxNode, OnnxNode]] = field(default_factory=list)
    retyped: list[tuple[OnnxNode, OnnxNode]] = field(default_factory=list)
    renamed: list[tuple[OnnxNode, OnnxNode]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The shared record's plain data plus ``bytes_before``/``bytes_after``."""
        return {**super().to_dict(), "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}

    def _changes(self) -> list[tuple[str, list[Any], Callable[[Any], str]]]:
        # Layers come from the exporter's name scopes.
        return [
            ("removed", self.removed, lambda n: f"{n.name} ({n.op_type})"),
            ("added", self.added, lambda n: f"{n.name} ({n.op_type})"),
            ("rewired", self.rewired, lambda p: f"{p[1].name} ({p[1].op_type})"),
            ("retyped", self.retyped, lambda p: f"{p[1].name}: {p[0].out_type} -> {p[1].out_type}"),
            ("renamed", self.renamed, lambda p: f"{p[0].name} -> {p[1].name}"),
        ]


def _structure_hashes(graph: OnnxGraph, producers: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Weisfeiler-Lehman hash of each node's 3-hop neighbourhood, labelled by op type."""
    g = nx.Graph()
    for node in graph.nodes:
        g.add_node(node.name, label=node.op_type)
    for node in graph.nodes:
        for src in producers[node.name]:
            if src in g:
                g.add_edge(src, node.name)
    hashes = nx.weisfeiler_lehman_subgraph_hashes(g, node_attr="label", iterations=3)
    return {name: values[-1] if values else "" for name, values in hashes.items()}


def _items(graph: OnnxGraph) -> list[Item]:
    producers = {n.name: graph.producers_of(n) for n in graph.nodes}
    hashes = _structure_hashes(graph, producers)
    return [Item(n.name, n.op_type, producers[n.name], hashes.get(n.name)) for n in graph.nodes]


def diff_onnx(
    before: str | os.PathLike | onnx.ModelProto,
    after: str | os.PathLike | onnx.ModelProto,
) -> OnnxDiff:
    """Diff two ONNX models (paths or ModelProtos). ModelFileError for missing/unreadable files."""
    model_a, path_a = read_model(before)
    model_b, path_b = read_model(after)
    a, b = OnnxGraph(model_a, path_a), OnnxGraph(model_b, path_b)
    old = {n.name: n for n in a.nodes}
    new = {n.name: n for n in b.nodes}
    # Nodes producing a tensor of the same name are very likely the same node.
    hints = [(a.producer[t], b.producer[t]) for t in a.producer if t in b.producer]
    mapping = align(_items(a), _items(b), hints=hints)
    matched_new = set(mapping.values())
    result = OnnxDiff(
        before=str(path_a) if path_a else "before",
        after=str(path_b) if path_b else "after",
        ops_before=a.histogram(),
        ops_after=b.histogram(),
        params_before=a.parameters(),
        params_after=b.parameters(),
        macs_before=sum(n.macs for n in a.nodes),
        macs_after=sum(n.macs for n in b.nodes),
        bytes_before=os.path.getsize(path_a) if path_a else model_a.ByteSize(),
        bytes_after=os.path.getsize(path_b) if path_b else model_b.ByteSize(),
    )
    result.removed = [n for name, n in old.items() if name not in mapping]
    result.added = [n for name, n in new.items() if name not in matched_new]
    old_producers = {n.name: a.producers_of(n) for n in a.nodes}
    for old_name, new_name in mapping.items():
        o, n = old[old_name], new[new_name]
        if old_name != new_name:
            result.renamed.append((o, n))
        if tuple(mapping.get(p, p) for p in old_producers[old_name]) != b.producers_of(n):
            result.rewired.append((o, n))
        if o.out_type != n.out_type:
            result.retyped.append((o, n))
    macs_a, macs_b = Counter(), Counter()
    for n in a.nodes:
        macs_a[n.layer] += n.macs
    for n in b.nodes:
        macs_b[n.layer] += n.macs
    params_a, params_b = a.layer_params(), b.layer_params()
    for layer in sorted(set(macs_a) | set(macs_b) | set(params_a) | set(params_b)):
        d = {"params": params_b.get(layer, 0) - params_a.get(layer, 0), "macs": macs_b[layer] - macs_a[layer]}
        if any(d.values()):
            result.layer_deltas[layer] = d
    return result
