"""Terminal rendering of diffs and near-misses (a model inspection renders itself: ``ModelInfo.to_text``).

Colour comes from :mod:`fxcompress.inspect.text_style`: only on a terminal without ``NO_COLOR``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from fxcompress.analysis.graph_diff import GraphDiff
from fxcompress.inspect.onnx_diff import OnnxDiff
from fxcompress.inspect.text_style import Style
from fxcompress.inspect.why_not import NearMiss

_KIND_STYLE = {"removed": ("-", "removed"), "added": ("+", "added")}


def _signed(value: int) -> str:
    return f"{value:+,}" if value else "0"


def _layer_section(groups: Mapping[str, Mapping[str, list[str]]], style: Style) -> list[str]:
    lines = [style("Changes by layer:", "head")]
    for layer, kinds in groups.items():
        lines.append(f"  {layer or '(top level)'}")
        for kind, entries in kinds.items():
            mark, tone = _KIND_STYLE.get(kind, ("~", "changed"))
            for entry in entries:
                lines.append("    " + style(f"{mark} {kind:<9} {entry}", tone))
    return lines


def _deltas(layer_deltas: Mapping[str, Mapping[str, int]], style: Style) -> list[str]:
    if not layer_deltas:
        return []
    lines = [style("Parameter and MAC changes by layer:", "head"), f"  {'layer':<40} {'params':>14} {'MACs':>16}"]
    for layer, d in layer_deltas.items():
        lines.append(f"  {layer or '(top level)':<40} {_signed(d['params']):>14} {_signed(d['macs']):>16}")
    return lines


def _op_table(before: Mapping[str, int], after: Mapping[str, int], style: Style, changed_only: bool = True) -> list[str]:
    ops = sorted(set(before) | set(after))
    rows = [(op, before.get(op, 0), after.get(op, 0)) for op in ops]
    if changed_only:
        rows = [r for r in rows if r[1] != r[2]]
    if not rows:
        return ["  no op-count changes"]
    width = max(24, *(len(r[0]) for r in rows))
    lines = [f"  {'op':<{width}} {'before':>7} {'after':>7} {'change':>7}"]
    for op, b, a in rows:
        tone = "added" if a > b else "removed" if a < b else "dim"
        lines.append("  " + style(f"{op:<{width}} {b:>7} {a:>7} {a - b:>+7}", tone))
    return lines


def render_graph_diff(diff: GraphDiff, *, color: bool = False) -> str:
    """A GraphDiff as text: headline, op-count changes, removed/added ops by layer, details."""
    style = Style(color)
    lines = [style(f"Diff {diff.before} -> {diff.after}", "head"),
             f"  compute nodes {diff.nodes_before} -> {diff.nodes_after}; parameters {diff.params_before:,} -> "
             f"{diff.params_after:,} ({_signed(diff.params_after - diff.params_before)}); MACs {diff.macs_before:,} -> "
             f"{diff.macs_after:,} ({_signed(diff.macs_after - diff.macs_before)})"]
    if diff.empty:
        note = f" ({len(diff.renamed)} nodes renamed)" if diff.renamed else ""
        lines.append(f"  no changes: the graphs compute the same thing{note}.")
        return "\n".join(lines)
    lines.append(style("Op counts (changed ops):", "head"))
    lines += _op_table(diff.ops_before, diff.ops_after, style)
    for title, groups, tone in (("Removed", diff.removed_by_operation(), "removed"),
                                ("Added", diff.added_by_operation(), "added")):
        for op, layers in groups.items():
            lines.append(style(f"{title} {op} ({len(layers)}): ", tone) + ", ".join(layers))
    if diff.renamed:
        lines.append(f"{len(diff.renamed)} node(s) renamed (aligned by provenance and structure).")
    lines += _layer_section(diff.by_layer(), style)
    lines += _deltas(diff.layer_deltas, style)
    return "\n".join(lines)


def render_onnx_diff(diff: OnnxDiff, *, color: bool = False) -> str:
    """An OnnxDiff as text: op-count table (checkable by hand), sizes, changes by layer."""
    style = Style(color)
    lines = [style(f"Diff {diff.before} -> {diff.after}", "head"),
             f"  nodes {diff.nodes_before} -> {diff.nodes_after}; parameters {diff.params_before:,} -> {diff.params_after:,}; "
             f"MACs {diff.macs_before:,} -> {diff.macs_after:,}; file {diff.bytes_before / 1e6:.2f} MB -> {diff.bytes_after / 1e6:.2f} MB",
             style("Op counts (changed ops):", "head")]
    lines += _op_table(diff.ops_before, diff.ops_after, style)
    if diff.empty:
        note = f" ({len(diff.renamed)} nodes renamed)" if diff.renamed else ""
        lines.append(f"  no changes: same ops on the same structure{note}.")
        return "\n".join(lines)
    if diff.renamed:
        lines.append(f"{len(diff.renamed)} node(s) matched under a different name (by outputs or structure).")
    lines += _layer_section(diff.by_layer(), style)
    lines += _deltas(diff.layer_deltas, style)
    return "\n".join(lines)


def render_near_misses(misses: Mapping[str, Sequence[NearMiss]], *, color: bool = False) -> str:
    """Near-misses by rule: where each rule matched but did not rewrite, and why."""
    style = Style(color)
    if not misses:
        return "No near-misses: every pattern a rule matched was rewritten (or no rule matched)."
    lines = []
    for rule, items in misses.items():
        lines.append(style(f"{rule} ({len(items)} near-miss{'es' if len(items) != 1 else ''})", "head"))
        for m in items:
            where = f"{m.layer} [{m.node}]" if m.layer else m.node
            lines.append(f"  {where}: " + style(m.reason, "changed") + style(f"  ({m.pass_name})", "dim"))
    return "\n".join(lines)
