"""Graphviz DOT rendering of a graph or of a diff, and SVG when the ``dot`` program is installed.

In a diff picture the after-graph is drawn with added nodes green, changed (rewired, retyped,
re-precisioned, annotated) nodes yellow and removed nodes from the before-graph red and dashed,
so the change is visible in context. Attribute reads (weights) are left out: they would double
the picture and say nothing a node's label does not.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Iterable

from fxcompress.analysis.graph_diff import GraphDiff
from fxcompress.inspect.onnx_diff import OnnxDiff
from fxcompress.inspect.onnx_graph import OnnxGraph
from fxcompress.analysis.snapshot import GraphSnapshot

_FILL = {"added": "#c8f7c5", "removed": "#f9c4c4", "changed": "#fff1a8", "same": "#ffffff", "io": "#dde8f7"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot(title: str, nodes: Iterable[tuple[str, str, tuple[str, ...], str]]) -> str:
    """nodes: (id, label, input ids, status) with status in _FILL."""
    nodes = list(nodes)
    known = {n[0] for n in nodes}
    lines = [f"digraph {_quote(title)} {{", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             f"  label={_quote(title)}; labelloc=t;"]
    for node_id, label, _, status in nodes:
        style = ', style="rounded,filled,dashed", color="#c0392b"' if status == "removed" else ""
        lines.append(f"  {_quote(node_id)} [label={_quote(label)}, fillcolor={_quote(_FILL[status])}{style}];")
    for node_id, _, inputs, status in nodes:
        for src in inputs:
            if src in known:
                attrs = ' [style=dashed, color="#c0392b"]' if status == "removed" else ""
                lines.append(f"  {_quote(src)} -> {_quote(node_id)}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _fx_label(n) -> str:
    where = f"\n{n.layer}" if n.layer else ""
    kind = f"\n{n.precision or n.dtype}{list(n.shape)}" if n.shape is not None else ""
    return f"{n.name}\n{n.operation}{where}{kind}"


def snapshot_dot(snapshot: GraphSnapshot, diff: GraphDiff | None = None, before: GraphSnapshot | None = None) -> str:
    """DOT of ``snapshot``; with ``diff`` (and the ``before`` snapshot), changes are highlighted."""
    added = {n.name for n in diff.added} if diff else set()
    changed = set()
    if diff:
        for pairs in (diff.rewired, diff.retyped, diff.reprecisioned, diff.annotated):
            changed |= {new.name for _, new in pairs}
    rows = []
    for n in snapshot.nodes:
        if n.op == "get_attr":
            continue
        status = "io" if n.op in ("placeholder", "output") else "added" if n.name in added else "changed" if n.name in changed else "same"
        rows.append((n.name, _fx_label(n), tuple(i for i in n.inputs), status))
    if diff:
        renamed = {old.name: new.name for old, new in diff.renamed}
        for n in diff.removed:
            if n.op != "get_attr":
                rows.append((f"{n.name} (removed)", _fx_label(n), tuple(renamed.get(i, i) for i in n.inputs), "removed"))
    title = f"{diff.before} -> {diff.after}" if diff else snapshot.label
    return _dot(title, rows)


def onnx_dot(graph: OnnxGraph, diff: OnnxDiff | None = None, *, title: str = "model") -> str:
    """DOT of an ONNX graph (the after-model of ``diff`` when given, with changes highlighted)."""
    added = {n.name for n in diff.added} if diff else set()
    changed = {new.name for _, new in (diff.rewired + diff.retyped)} if diff else set()
    rows = [(f"<input:{name}>", name, (), "io") for name in graph.graph_inputs]
    for n in graph.nodes:
        producers = tuple(p for p in graph.producers_of(n) if p != "<const>")
        label = f"{n.name}\n{n.op_type}" + (f"\n{n.layer}" if n.layer else "") + (f"\n{n.out_type}" if n.out_type else "")
        rows.append((n.name, label, producers, "added" if n.name in added else "changed" if n.name in changed else "same"))
    if diff:
        for n in diff.removed:
            rows.append((f"{n.name} (removed)", f"{n.name}\n{n.op_type}", (), "removed"))
    return _dot(f"{diff.before} -> {diff.after}" if diff else title, rows)


def dot_available() -> bool:
    """Whether Graphviz's ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


def to_svg(dot_text: str, *, timeout: float = 120.0) -> str | None:
    """SVG text laid out by Graphviz, or None when ``dot`` is not installed (or fails)."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 and "<svg" in done.stdout else None
