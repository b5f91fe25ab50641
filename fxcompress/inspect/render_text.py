"""Terminal rendering of diffs, model inspections and near-misses.

Colour (red removed, green added, yellow changed) is used only when the stream is a terminal and
``NO_COLOR`` is not set, so piped output and files stay plain text.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Mapping, Sequence

from fxcompress.analysis.graph_diff import GraphDiff
from fxcompress.inspect.model_info import ModelInfo
from fxcompress.inspect.onnx_diff import OnnxDiff
from fxcompress.inspect.why_not import NearMiss

_CODES = {"removed": "31", "added": "32", "changed": "33", "head": "1", "dim": "2"}
_KIND_STYLE = {"removed": ("-", "removed"), "added": ("+", "added")}


def use_color(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (stdout by default) is a terminal and NO_COLOR is unset."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, kind: str) -> str:
        return f"\033[{_CODES[kind]}m{text}\033[0m" if self.color else text


def _signed(value: int) -> str:
    return f"{value:+,}" if value else "0"


def _layer_section(groups: Mapping[str, Mapping[str, list[str]]], style: _Style) -> list[str]:
    lines = [style("Changes by layer:", "head")]
    for layer, kinds in groups.items():
        lines.append(f"  {layer or '(top level)'}")
        for kind, entries in kinds.items():
            mark, tone = _KIND_STYLE.get(kind, ("~", "changed"))
            for entry in entries:
                lines.append("    " + style(f"{mark} {kind:<9} {entry}", tone))
    return lines


def _deltas(layer_deltas: Mapping[str, Mapping[str, int]], style: _Style) -> list[str]:
    if not layer_deltas:
        return []
    lines = [style("Parameter and MAC changes by layer:", "head"), f"  {'layer':<40} {'params':>14} {'MACs':>16}"]
    for layer, d in layer_deltas.items():
        lines.append(f"  {layer or '(top level)':<40} {_signed(d['params']):>14} {_signed(d['macs']):>16}")
    return lines


def _op_table(before: Mapping[str, int], after: Mapping[str, int], style: _Style, changed_only: bool = True) -> list[str]:
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
    style = _Style(color)
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
    style = _Style(color)
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


def _share(x: float) -> str:
    return f"{x * 100:.1f}%"


def render_model_info(info: ModelInfo, *, color: bool = False) -> str:
    """A ModelInfo as text."""
    style = _Style(color)
    lines = [style(f"{info.name}", "head")]
    if info.file_bytes is not None:
        lines.append(f"  file size        {info.file_bytes / 1e6:.3f} MB ({info.file_bytes:,} bytes)")
    if info.opsets:
        lines.append("  opsets           " + ", ".join(f"{d} {v}" for d, v in info.opsets.items()))
    lines += [f"  nodes            {info.nodes:,}",
              f"  parameters       {info.parameters:,}",
              f"  MACs             {info.macs:,} ({info.macs / 1e9:.3f} G)",
              f"  quantized MACs   {_share(info.quantized_mac_share)}",
              f"  zero weights     {_share(info.sparse_share)} (of elements in tensors with 2+ dims)"]
    if info.weight_dtypes:
        lines.append("  stored dtypes    " + ", ".join(f"{k} {v:,}" for k, v in sorted(info.weight_dtypes.items())))
    for label, values in (("inputs", info.inputs), ("outputs", info.outputs)):
        if values:
            lines.append(f"  {label:<16} " + "; ".join(values))
    if info.providers:
        lines.append(style("Execution providers (a session was created on each):", "head"))
        for provider, verdict in info.providers.items():
            tone = "added" if verdict == "runs it" else "changed"
            lines.append("  " + style(f"{provider:<24} {verdict}", tone))
    lines.append(style("Op histogram:", "head"))
    for op, count in info.histogram.most_common():
        lines.append(f"  {op:<32} {count:>6}")
    if info.metadata:
        lines.append(style("Metadata:", "head"))
        lines += [f"  {k} = {v}" for k, v in sorted(info.metadata.items())]
    return "\n".join(lines)


def render_near_misses(misses: Mapping[str, Sequence[NearMiss]], *, color: bool = False) -> str:
    """Near-misses by rule: where each rule matched but did not rewrite, and why."""
    style = _Style(color)
    if not misses:
        return "No near-misses: every pattern a rule matched was rewritten (or no rule matched)."
    lines = []
    for rule, items in misses.items():
        lines.append(style(f"{rule} ({len(items)} near-miss{'es' if len(items) != 1 else ''})", "head"))
        for m in items:
            where = f"{m.layer} [{m.node}]" if m.layer else m.node
            lines.append(f"  {where}: " + style(m.reason, "changed") + style(f"  ({m.pass_name})", "dim"))
    return "\n".join(lines)
