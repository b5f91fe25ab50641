"""Differences between two ONNX models: op counts, added/removed/rewired nodes, types, weights.

Nodes are aligned (:mod:`fxcompress.analysis.align`) by node name, then by shared output tensor
names, then by structure: same op on aligned producers, and finally same op with the same
networkx Weisfeiler-Lehman hash of its neighbourhood (so a re-exported model whose node names all
changed still lines up). Op-count changes come straight from the two graphs' node lists, so a
user can check them by hand with ``collections.Counter(n.op_type for n in model.graph.node)``.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import onnx

from fxcompress.analysis.align import Item, align
from fxcompress.inspect.onnx_graph import OnnxGraph, OnnxNode, read_model


@dataclass
class OnnxDiff:
    """What changed from the ``before`` model to the ``after`` model."""

    before: str
    after: str
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    added: list[OnnxNode] = field(default_factory=list)
    removed: list[OnnxNode] = field(default_factory=list)
    rewired: list[tuple[OnnxNode, OnnxNode]] = field(default_factory=list)
    retyped: list[tuple[OnnxNode, OnnxNode]] = field(default_factory=list)
    renamed: list[tuple[OnnxNode, OnnxNode]] = field(default_factory=list)
    layer_deltas: dict[str, dict[str, int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def op_delta(self) -> dict[str, int]:
        """``{op_type: after count - before count}`` for every op whose count changed."""
        delta = Counter(self.ops_after)
        delta.subtract(self.ops_before)
        return {op: d for op, d in sorted(delta.items()) if d}

    @property
    def nodes_before(self) -> int:
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.ops_after.values())

    @property
    def empty(self) -> bool:
        """True when nothing but node names changed."""
        return not (self.added or self.removed or self.rewired or self.retyped) and self.params_before == self.params_after

    def by_layer(self) -> dict[str, dict[str, list[str]]]:
        """Changes grouped by layer (from the exporter's name scopes), layers sorted by name."""
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for n in self.removed:
            groups[n.layer]["removed"].append(f"{n.name} ({n.op_type})")
        for n in self.added:
            groups[n.layer]["added"].append(f"{n.name} ({n.op_type})")
        for old, new in self.rewired:
            groups[new.layer]["rewired"].append(f"{new.name} ({new.op_type})")
        for old, new in self.retyped:
            groups[new.layer]["retyped"].append(f"{new.name}: {old.out_type} -> {new.out_type}")
        for old, new in self.renamed:
            groups[new.layer]["renamed"].append(f"{old.name} -> {new.name}")
        return {layer: dict(kinds) for layer, kinds in sorted(groups.items())}

    def to_text(self) -> str:
        """One line: op-count changes, nodes, parameters, MACs (``fxcompress.inspect.render_text`` lists every change)."""
        ops = ", ".join(f"{'+' if d > 0 else ''}{d} {op}" for op, d in self.op_delta.items())
        return (f"{ops or 'no op changes'}; nodes {self.nodes_before} -> {self.nodes_after}; "
                f"params {self.params_before:,} -> {self.params_after:,}; MACs {self.macs_before:,} -> {self.macs_after:,}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): the counts and sizes before and after, op-count changes, and the changes by layer."""
        return {"before": self.before, "after": self.after, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "op_delta": self.op_delta, "by_layer": self.by_layer(),
                "layer_deltas": {k: dict(v) for k, v in self.layer_deltas.items()}}

    def __str__(self) -> str:
        return self.to_text()


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
