"""The record every diff is: what changed between two versions of a model, by node and by layer.

:class:`~fxcompress.analysis.graph_diff.GraphDiff` (two GraphModule snapshots) and
:class:`~fxcompress.inspect.onnx_diff.OnnxDiff` (two ONNX models) differ only in the nodes they
hold and how one node's change is worded; the counts, the op-count changes, emptiness, the grouping
by layer and the renderings (``to_text``, ``to_dict``, ``str``) are written once, here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ModelDiff:
    """What changed from ``before`` to ``after``; subclasses say how one node's change reads.

    ``added``/``removed`` hold nodes and ``rewired``/``retyped``/``renamed`` ``(old, new)`` pairs
    of the same node; every node has ``.name`` and ``.layer``. ``ops_before``/``ops_after`` count
    the compute nodes by operation, so ``op_delta`` and the node counts are derived, never stored.
    ``layer_deltas`` holds per layer the change in parameters and MACs (only layers that changed).
    """

    before: str
    after: str
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    added: list[Any] = field(default_factory=list)
    removed: list[Any] = field(default_factory=list)
    rewired: list[tuple[Any, Any]] = field(default_factory=list)
    retyped: list[tuple[Any, Any]] = field(default_factory=list)
    renamed: list[tuple[Any, Any]] = field(default_factory=list)
    layer_deltas: dict[str, dict[str, int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0

    @property
    def op_delta(self) -> dict[str, int]:
        """``{operation: after count - before count}`` for every operation whose count changed, sorted."""
        delta = Counter(self.ops_after)
        delta.subtract(self.ops_before)
        return {op: d for op, d in sorted(delta.items()) if d}

    @property
    def nodes_before(self) -> int:
        """Compute nodes before."""
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        """Compute nodes after."""
        return sum(self.ops_after.values())

    @property
    def empty(self) -> bool:
        """True when nothing but node names changed."""
        return (not any(items for kind, items, _ in self._changes() if kind != "renamed")
                and self.params_before == self.params_after)

    def by_layer(self) -> dict[str, dict[str, list[str]]]:
        """Changes grouped by the layer they belong to (``{layer: {kind: [line, ...]}}``), layers sorted by name."""
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for kind, items, describe in self._changes():
            for item in items:
                node = item[1] if isinstance(item, tuple) else item  # a pair is grouped under its new node
                groups[node.layer][kind].append(describe(item))
        return {layer: dict(kinds) for layer, kinds in sorted(groups.items())}

    def to_text(self) -> str:
        """One line, e.g. ``-20 aten.batch_norm; nodes 69 -> 49; params 11,689,512 -> 11,679,912``
        (``fxcompress.inspect.render_text`` lists every change by layer)."""
        ops = ", ".join(f"{'+' if d > 0 else ''}{d} {op}" for op, d in self.op_delta.items())
        macs = f"; MACs {self.macs_before:,} -> {self.macs_after:,}" if self.macs_before != self.macs_after else ""
        renamed = f"; {len(self.renamed)} renamed" if self.renamed else ""
        return (f"{ops or 'no op changes'}; nodes {self.nodes_before} -> {self.nodes_after}; "
                f"params {self.params_before:,} -> {self.params_after:,}{macs}{renamed}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): the counts before and after, op-count changes, and the changes by layer."""
        return {"before": self.before, "after": self.after, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after, "op_delta": self.op_delta,
                "by_layer": self.by_layer(), "layer_deltas": {k: dict(v) for k, v in self.layer_deltas.items()}}

    def __str__(self) -> str:
        return self.to_text()

    def _changes(self) -> list[tuple[str, list[Any], Callable[[Any], str]]]:
        """``(kind, items, describe)`` in the order a reader sees them; subclasses word the lines."""
        raise NotImplementedError
