"""Differences between two graph snapshots: added, removed, rewired and retyped nodes.

Nodes are aligned by name: fx keeps a node's name for its lifetime, so a node present in both
snapshots is the same node, and a new node is one a pass created.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from fxcompress.analysis.graph_stats import COMPUTE_OPS
from fxcompress.inspect.snapshot import GraphSnapshot, NodeInfo


@dataclass
class GraphDiff:
    """What changed from ``before`` to ``after``."""

    before: str
    after: str
    added: list[NodeInfo] = field(default_factory=list)
    removed: list[NodeInfo] = field(default_factory=list)
    rewired: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    retyped: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    op_delta: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.rewired or self.retyped) and self.params_before == self.params_after

    def by_layer(self) -> dict[str, dict[str, list[str]]]:
        """Changes grouped by the layer (module path) they belong to."""
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for n in self.removed:
            groups[n.layer]["removed"].append(f"{n.name} ({n.operation})")
        for n in self.added:
            groups[n.layer]["added"].append(f"{n.name} ({n.operation})")
        for old, new in self.rewired:
            groups[new.layer]["rewired"].append(f"{new.name}: {list(old.inputs)} -> {list(new.inputs)}")
        for old, new in self.retyped:
            groups[new.layer]["retyped"].append(f"{new.name}: {old.dtype}{list(old.shape or ())} -> {new.dtype}{list(new.shape or ())}")
        return {layer: dict(kinds) for layer, kinds in sorted(groups.items())}

    def summary(self) -> str:
        """One line, e.g. ``-20 aten.batch_norm; nodes 69 -> 49; params 11.69M -> 11.68M``."""
        ops = ", ".join(f"{'+' if d > 0 else ''}{d} {op}" for op, d in sorted(self.op_delta.items()))
        return (
            f"{ops or 'no op changes'}; nodes {self.nodes_before} -> {self.nodes_after}; "
            f"params {self.params_before:,} -> {self.params_after:,}"
        )


def diff_snapshots(before: GraphSnapshot, after: GraphSnapshot) -> GraphDiff:
    """Diff two snapshots of (usually) the same compile run."""
    old = {n.name: n for n in before.nodes}
    new = {n.name: n for n in after.nodes}
    result = GraphDiff(before.label, after.label)
    result.removed = [n for name, n in old.items() if name not in new and n.op in (*COMPUTE_OPS, "get_attr", "placeholder")]
    result.added = [n for name, n in new.items() if name not in old and n.op in (*COMPUTE_OPS, "get_attr", "placeholder")]
    for name, n in new.items():
        if name in old:
            o = old[name]
            if o.inputs != n.inputs and n.op != "output":
                result.rewired.append((o, n))
            if (o.shape, o.dtype) != (n.shape, n.dtype):
                result.retyped.append((o, n))
    delta = Counter(after.histogram())
    delta.subtract(before.histogram())
    result.op_delta = {op: d for op, d in delta.items() if d}
    result.nodes_before, result.nodes_after = len(before.compute_nodes), len(after.compute_nodes)
    result.params_before, result.params_after = before.parameters, after.parameters
    return result
