"""Differences between two graph snapshots: added, removed, rewired, retyped and renamed nodes.

Nodes are aligned (:mod:`fxcompress.analysis.align`) by name first: fx keeps a node's name for its
lifetime, so a node present in both snapshots is the same node. Nodes a pass re-created under a
new name are recognised by the provenance the pass stamped (``fxcompress_provenance``), by having
the same operation on the same (aligned) inputs, and finally by operation and layer
(``nn_module_stack``). Everything is grouped by layer so a user reads "layer1.0.bn1: removed
aten.batch_norm" rather than a list of node names.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from fxcompress.analysis.graph_stats import COMPUTE_OPS
from fxcompress.analysis.align import Item, align
from fxcompress.analysis.model_diff import ModelDiff
from fxcompress.analysis.snapshot import GraphSnapshot, NodeInfo, layer_totals

#: Node kinds a diff lists individually (outputs are implied by their inputs).
_LISTED = (*COMPUTE_OPS, "get_attr", "placeholder")


@dataclass
class GraphDiff(ModelDiff):
    """What changed from ``before`` to ``after`` snapshot (the shared record: :class:`ModelDiff`).

    Pairs are ``(old, new)`` NodeInfos of the same node. Beyond the shared record: ``reprecisioned``
    and ``annotated`` pairs, and ``replaced``, mapping an added node's name to the removed nodes its
    provenance says it replaces.
    """

    added: list[NodeInfo] = field(default_factory=list)
    removed: list[NodeInfo] = field(default_factory=list)
    rewired: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    retyped: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    renamed: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    reprecisioned: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    annotated: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    replaced: dict[str, list[str]] = field(default_factory=dict)

    def removed_by_operation(self) -> dict[str, list[str]]:
        """Removed compute nodes as ``{operation: [layer or node name, ...]}`` in graph order.

        This is the answer to "which batch norms were folded?": ``{"aten.batch_norm": ["bn1",
        "layer1.0.bn1", ...]}``.
        """
        return _by_operation(self.removed)

    def added_by_operation(self) -> dict[str, list[str]]:
        """Added compute nodes as ``{operation: [layer or node name, ...]}``."""
        return _by_operation(self.added)

    def _changes(self) -> list[tuple[str, list[Any], Callable[[Any], str]]]:
        def added(n: NodeInfo) -> str:
            origin = f" from {', '.join(self.replaced[n.name])}" if n.name in self.replaced else ""
            return f"{n.name} ({n.operation}){origin}"

        def annotated(pair: tuple[NodeInfo, NodeInfo]) -> str:
            old, new = pair
            changes = sorted(set(new.annotations) - set(old.annotations))
            gone = sorted(set(old.annotations) - set(new.annotations))
            return f"{new.name}: " + ", ".join([f"+{k}={v}" for k, v in changes] + [f"-{k}" for k, _ in gone])

        return [
            ("removed", self.removed, lambda n: f"{n.name} ({n.operation})"),
            ("added", self.added, added),
            ("rewired", self.rewired, lambda p: f"{p[1].name}: {list(p[0].inputs)} -> {list(p[1].inputs)}"),
            ("retyped", self.retyped,
             lambda p: f"{p[1].name}: {p[0].dtype}{list(p[0].shape or ())} -> {p[1].dtype}{list(p[1].shape or ())}"),
            ("precision", self.reprecisioned, lambda p: f"{p[1].name}: {p[0].precision} -> {p[1].precision}"),
            ("annotated", self.annotated, annotated),
            ("renamed", self.renamed, lambda p: f"{p[0].name} -> {p[1].name}"),
        ]


def _by_operation(nodes: list[NodeInfo]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        if n.op in COMPUTE_OPS:
            out[n.operation].append(n.layer or n.name)
    return dict(out)


def _key(n: NodeInfo) -> tuple:
    # Attributes and inputs are identified by what they read; compute nodes by their operation.
    return (n.op, n.operation, n.target)


def _inherit_layers(nodes: list[NodeInfo], old: dict[str, NodeInfo]) -> list[NodeInfo]:
    """Give pass-created nodes without a layer the layer of the node their provenance names."""
    out = []
    for n in nodes:
        if not n.layer and n.provenance:
            layer = next((old[s].layer for s in n.provenance[1] if s in old and old[s].layer), "")
            n = replace(n, layer=layer) if layer else n
        out.append(n)
    return out


def diff_snapshots(before: GraphSnapshot, after: GraphSnapshot) -> GraphDiff:
    """Diff two snapshots (usually of one compile run; any two GraphModules work)."""
    old = {n.name: n for n in before.nodes}
    hints = [
        (sources[0], n.name)
        for n in after.nodes
        if n.provenance and n.name not in old and len(n.provenance[1]) == 1
        for sources in [n.provenance[1]]
    ]
    after_nodes = _inherit_layers(after.nodes, old)
    new = {n.name: n for n in after_nodes}
    # Nodes a pass created are not grouped by layer: a new node that happens to share an
    # operation and layer with a removed one is a replacement, not the same node.
    mapping = align(
        [Item(n.name, _key(n), n.inputs, n.layer) for n in before.nodes],
        [Item(n.name, _key(n), n.inputs, None if n.provenance else n.layer) for n in after_nodes],
        hints=hints,
    )
    matched_new = set(mapping.values())
    result = GraphDiff(before.label, after.label)
    result.removed = [n for name, n in old.items() if name not in mapping and n.op in _LISTED]
    result.added = [n for name, n in new.items() if name not in matched_new and n.op in _LISTED]
    removed_names = {n.name for n in result.removed}
    for n in result.added:
        if n.provenance and n.provenance[1]:
            result.replaced[n.name] = [s for s in n.provenance[1] if s in removed_names] or list(n.provenance[1])
    for old_name, new_name in mapping.items():
        o, n = old[old_name], new[new_name]
        if o.op == "output" and n.op == "output":
            continue
        if old_name != new_name:
            result.renamed.append((o, n))
        mapped_inputs = tuple(mapping.get(i, i) for i in o.inputs)
        if mapped_inputs != n.inputs:
            # Old inputs are shown under their new names, so only real rewiring stands out.
            result.rewired.append((replace(o, inputs=mapped_inputs), n))
        if (o.shape, o.dtype) != (n.shape, n.dtype):
            result.retyped.append((o, n))
        elif o.precision != n.precision:
            result.reprecisioned.append((o, n))
        if o.annotations != n.annotations:
            result.annotated.append((o, n))
    # Keep graph order of the after-graph for readable output.
    order = {name: i for i, name in enumerate(new)}
    for pairs in (result.renamed, result.rewired, result.retyped, result.reprecisioned, result.annotated):
        pairs.sort(key=lambda pair: order[pair[1].name])
    result.ops_before, result.ops_after = before.histogram(), after.histogram()
    result.params_before, result.params_after = before.parameters, after.parameters
    result.macs_before, result.macs_after = before.macs, after.macs
    totals_before, totals_after = layer_totals(before.nodes), layer_totals(after_nodes)
    for layer in sorted(set(totals_before) | set(totals_after)):
        b = totals_before.get(layer, {"params": 0, "macs": 0})
        a = totals_after.get(layer, {"params": 0, "macs": 0})
        d = {k: a[k] - b[k] for k in ("params", "macs")}
        if any(d.values()):
            result.layer_deltas[layer] = d
    return result
