"""A self-contained HTML compile report: no network, inline CSS, JS and SVG.

Sections: summary figures (nodes, parameters, MACs, drift, parity, size, latency), a per-pass
timeline where clicking a pass shows its diff, before/after op histograms, a latency-vs-size
plot of the variants measured, per-layer precision and sparsity, and the near-misses ("why
not?"). The page records script errors into the DOM (``body[data-js-errors]``) and marks
``body[data-ready="yes"]`` once its script has run, so a headless browser test can tell a page
that works from one that merely loads.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fxcompress.analysis.graph_diff import GraphDiff
from fxcompress.inspect.onnx_diff import OnnxDiff
from fxcompress.analysis.snapshot import GraphSnapshot, NodeInfo
from fxcompress.inspect.why_not import NearMiss, why_not


@dataclass
class Variant:
    """One measured variant for the latency/size figure (a recipe's ONNX file, or a baseline)."""

    label: str
    p50_ms: float | None = None
    p90_ms: float | None = None
    size_bytes: int | None = None
    provider: str | None = None


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2a44;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}header p{margin:4px 0 0;opacity:.8}
main{padding:16px 24px;max-width:1300px}section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px;margin:0 0 16px}
h2{font-size:16px;margin:0 0 10px}h3{font-size:14px;margin:12px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #dde1e7;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:18px}.card span{font-size:12px;color:#5b6475}
table{border-collapse:collapse;font-size:12px;margin:4px 0}td,th{border-bottom:1px solid #eceff3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
#timeline{display:flex;flex-wrap:wrap;gap:6px;list-style:none;padding:0;margin:0 0 10px}
#timeline li{border:1px solid #c9ced8;border-radius:14px;padding:4px 10px;font-size:12px;cursor:pointer;background:#fff}
#timeline li.pass-changed{border-color:#2e7d32;background:#eef8ee}#timeline li.pass-rolledback{border-color:#c0392b;background:#fdeeee}
#timeline li.selected{outline:2px solid #1d5bd6}.panel{display:none}.panel.shown{display:block}
.added{color:#1e7b34}.removed{color:#b3261e}.changed{color:#8a6d00}.muted{color:#6b7280}
details summary{cursor:pointer;font-size:13px}code{font-size:12px}#js-errors{color:#b3261e;font-weight:bold}
"""

_HEAD_SCRIPT = """
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  window.__reportErrors.push(String(e.message || e));
  document.documentElement.setAttribute('data-js-errors', String(window.__reportErrors.length));
  var box = document.getElementById('js-errors');
  if (box) { box.textContent = 'Script errors: ' + window.__reportErrors.join(' | '); }
});
"""

_BODY_SCRIPT = """
(function () {
  var items = document.querySelectorAll('#timeline li');
  function show(index) {
    items.forEach(function (li) { li.classList.toggle('selected', li.dataset.index === index); });
    document.querySelectorAll('.panel').forEach(function (p) { p.classList.toggle('shown', p.dataset.index === index); });
  }
  items.forEach(function (li) { li.addEventListener('click', function () { show(li.dataset.index); }); });
  var first = document.querySelector('#timeline li.pass-changed') || items[0];
  if (first) { show(first.dataset.index); }
  document.getElementById('js-status').textContent = 'interactive: ' + items.length + ' passes';
  document.body.setAttribute('data-ready', 'yes');
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _signed(value: int) -> str:
    return f"{value:+,}" if value else "0"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f'<th class="{"num" if i in numeric else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if i in numeric else ""}">{_e(c)}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def diff_html(diff: GraphDiff | OnnxDiff) -> str:
    """The HTML fragment of one diff: op-count changes, removed/added ops by layer, details by layer."""
    parts = [f'<p>nodes {diff.nodes_before} &rarr; {diff.nodes_after}; parameters {diff.params_before:,} &rarr; '
             f'{diff.params_after:,} ({_signed(diff.params_after - diff.params_before)}); MACs {diff.macs_before:,} &rarr; '
             f'{diff.macs_after:,} ({_signed(diff.macs_after - diff.macs_before)})</p>']
    if diff.empty:
        return parts[0] + f'<p class="muted">No changes ({len(diff.renamed)} nodes renamed).</p>'
    rows = [(op, diff.ops_before.get(op, 0), diff.ops_after.get(op, 0), f"{d:+d}") for op, d in sorted(diff.op_delta.items())]
    parts.append("<h3>Op counts (changed ops)</h3>" + (_table(["op", "before", "after", "change"], rows, (1, 2, 3)) if rows else "<p>none</p>"))
    if isinstance(diff, GraphDiff):
        for title, groups, tone in (("Removed", diff.removed_by_operation(), "removed"), ("Added", diff.added_by_operation(), "added")):
            for op, layers in groups.items():
                parts.append(f'<p class="{tone}"><b>{title} {_e(op)} ({len(layers)}):</b> {_e(", ".join(layers))}</p>')
    by_layer = diff.by_layer()
    if by_layer:
        rows = [(layer or "(top level)", kind, entry) for layer, kinds in by_layer.items() for kind, entries in kinds.items() for entry in entries]
        parts.append(f"<details><summary>Changes by layer ({len(by_layer)} layers, {len(rows)} entries)</summary>"
                     + _table(["layer", "change", "detail"], rows) + "</details>")
    if diff.layer_deltas:
        rows = [(layer or "(top level)", _signed(d["params"]), _signed(d["macs"])) for layer, d in diff.layer_deltas.items()]
        parts.append("<details><summary>Parameter and MAC changes by layer</summary>" + _table(["layer", "params", "MACs"], rows, (1, 2)) + "</details>")
    return "".join(parts)


def histogram_svg(before: Mapping[str, int], after: Mapping[str, int], *, labels: tuple[str, str] = ("before", "after")) -> str:
    """Horizontal paired bars per op (grey before, blue after), drawn as inline SVG."""
    ops = sorted(set(before) | set(after), key=lambda op: (-max(before.get(op, 0), after.get(op, 0)), op))
    top = max([1, *before.values(), *after.values()])
    row, label_w, bar_w = 22, 230, 360
    height = 30 + row * len(ops)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="figure" role="img" width="{label_w + bar_w + 60}" height="{height}" '
           f'aria-label="op histogram">',
           f'<rect x="{label_w}" y="4" width="10" height="10" fill="#9aa3b2"/><text x="{label_w + 14}" y="13" font-size="11">{_e(labels[0])}</text>',
           f'<rect x="{label_w + 90}" y="4" width="10" height="10" fill="#2f6fdf"/><text x="{label_w + 104}" y="13" font-size="11">{_e(labels[1])}</text>']
    for i, op in enumerate(ops):
        y = 24 + i * row
        b, a = before.get(op, 0), after.get(op, 0)
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" font-size="11" text-anchor="end">{_e(op)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{bar_w * b / top:.1f}" height="8" fill="#9aa3b2"><title>{_e(op)} {labels[0]}: {b}</title></rect>')
        out.append(f'<rect x="{label_w}" y="{y + 10}" width="{bar_w * a / top:.1f}" height="8" fill="#2f6fdf"><title>{_e(op)} {labels[1]}: {a}</title></rect>')
        out.append(f'<text x="{label_w + bar_w * max(a, b) / top + 4:.1f}" y="{y + 14}" font-size="10" fill="#444">{b} &#8594; {a}</text>')
    out.append("</svg>")
    return "".join(out)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    for step in (1, 2, 2.5, 5, 10):
        scale = 10 ** int(f"{value:e}".split("e")[1])
        if value <= step * scale:
            return step * scale
    return value


def variants_svg(variants: Sequence[Variant]) -> str:
    """Scatter of latency (p50 ms, y) against file size (MB, x), one labelled point per variant."""
    points = [v for v in variants if v.p50_ms is not None and v.size_bytes is not None]
    width, height, left, bottom = 560, 300, 60, 40
    x_max = _nice_max(max([v.size_bytes / 1e6 for v in points], default=1.0) * 1.1)
    y_max = _nice_max(max([v.p50_ms for v in points], default=1.0) * 1.1)
    plot_w, plot_h = width - left - 20, height - bottom - 20

    def sx(x: float) -> float:
        return left + plot_w * x / x_max

    def sy(y: float) -> float:
        return 20 + plot_h * (1 - y / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="figure" role="img" width="{width}" height="{height}" aria-label="latency and size per variant">',
           f'<line x1="{left}" y1="{sy(0)}" x2="{left + plot_w}" y2="{sy(0)}" stroke="#333"/>',
           f'<line x1="{left}" y1="20" x2="{left}" y2="{sy(0)}" stroke="#333"/>']
    for k in range(5):
        xv, yv = x_max * k / 4, y_max * k / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{sy(0) + 14:.1f}" font-size="10" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{left - 6}" y="{sy(yv) + 3:.1f}" font-size="10" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<line x1="{left}" y1="{sy(yv):.1f}" x2="{left + plot_w}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">file size (MB)</text>')
    out.append(f'<text x="14" y="{20 + plot_h / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 14 {20 + plot_h / 2})">p50 latency (ms)</text>')
    colors = ["#2f6fdf", "#e07b00", "#2e9e44", "#b03aa8", "#c0392b", "#17a2b8"]
    for i, v in enumerate(points):
        x, y = sx(v.size_bytes / 1e6), sy(v.p50_ms)
        out.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colors[i % len(colors)]}">'
                   f'<title>{_e(v.label)}: {v.p50_ms:.3f} ms, {v.size_bytes / 1e6:.2f} MB</title></circle>')
        out.append(f'<text x="{x + 9:.1f}" y="{y + 4:.1f}" font-size="11">{_e(v.label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _weight_of(layer: NodeInfo, by_name: dict[str, NodeInfo]) -> NodeInfo | None:
    """The stored weight a conv/linear/matmul/embedding reads as its second input.

    Quantization and sparsity put ops between the layer and its parameter (fake-quantize with its
    scale and zero point, the mask multiply, a transpose): their first input leads on to the
    weight. Reading whichever attribute is nearest would report a zero-point buffer as the weight.
    """
    if len(layer.inputs) < 2 or layer.inputs[1] not in by_name:
        return None
    node = by_name[layer.inputs[1]]
    while node.op != "get_attr":
        if node.op != "call_function" or not node.inputs or node.inputs[0] not in by_name:
            return None
        node = by_name[node.inputs[0]]
    return node


def layer_table_rows(result: Any) -> list[tuple[str, str, str, str]]:
    """Per layer with MACs in the final graph: precision, weight elements, zero share, MACs."""
    final: GraphSnapshot = result.snapshots.snapshots[-1]
    by_name = {n.name: n for n in final.nodes}
    module = result.module
    rows = []
    for n in final.nodes:
        if not n.macs:
            continue
        weight = _weight_of(n, by_name)
        zeros, total = "-", "-"
        if weight is not None:
            try:
                tensor = module.get_parameter(weight.target)
            except AttributeError:
                tensor = module.get_buffer(weight.target)
            total = f"{tensor.numel():,}"
            zeros = f"{float((tensor == 0).float().mean()) * 100:.1f}%"
        rows.append((n.layer or n.name, n.precision or "-", total, zeros, f"{n.macs:,}"))
    return rows


def _summary_cards(result: Any, variants: Sequence[Variant]) -> str:
    report = result.report
    snaps = result.snapshots.snapshots
    first, last = snaps[0], snaps[-1]
    cards = [("recipe", report.recipe), ("compute nodes", f"{report.nodes_before} → {report.nodes_after}"),
             ("parameters", f"{report.params_before:,} → {report.params_after:,}"),
             ("MACs", f"{first.macs / 1e6:.2f}M → {last.macs / 1e6:.2f}M"),
             ("drift vs original", f"{report.drift:.2e}"
              + (f" over unmasked positions ({report.unmasked_drift:.2e} over all)" if report.masked else "")
              + f" (allowed {report.tolerance:.0e})"),
             ("compile time", f"{report.seconds:.2f} s")]
    if report.parity is not None:
        cards.append(("ONNX parity", report.parity.to_text()))
    for v in variants:
        if v.p50_ms is not None:
            size = f", {v.size_bytes / 1e6:.2f} MB" if v.size_bytes is not None else ""
            cards.append((f"{v.label} ({v.provider or '?'})", f"{v.p50_ms:.3f} ms p50{size}"))
    return '<div class="cards">' + "".join(f'<div class="card"><span>{_e(k)}</span><b>{_e(v)}</b></div>' for k, v in cards) + "</div>"


def _timeline(result: Any, misses: Mapping[str, Sequence[NearMiss]]) -> str:
    items, panels = [], []
    for i, r in enumerate(result.report.records):
        css = "pass-rolledback" if r.rolled_back else "pass-changed" if r.modified else "pass-unchanged"
        nodes = f"{r.nodes_before}→{r.nodes_after}" if r.nodes_before is not None else ""
        ms = f", {r.seconds * 1000:.1f} ms" if r.seconds is not None else ""
        items.append(f'<li class="pass {css}" data-index="{i}" title="{_e(r.name)}">{i + 1}. {_e(r.name)} '
                     f'<span class="muted">{nodes}{ms}</span></li>')
        body = [f"<h3>{i + 1}. {_e(r.name)} (iteration {r.iteration + 1})</h3>"]
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
        if stats:
            body.append(f"<p>stats: <code>{_e(stats)}</code></p>")
        if r.drift is not None:
            body.append(f"<p>drift after this pass: {r.drift:.2e}</p>")
        if r.rolled_back:
            body.append(f'<p class="removed">Rolled back: {_e(r.rolled_back)}</p>')
        elif isinstance(r.extra.get("diff"), GraphDiff):
            body.append(diff_html(r.extra["diff"]))
        else:
            body.append('<p class="muted">The pass changed nothing.</p>')
        own = [m for items_ in misses.values() for m in items_ if m.pass_name == r.name]
        if own:
            body.append("<h3>Near-misses</h3>" + _table(["rule", "layer", "node", "reason"], [(m.rule, m.layer, m.node, m.reason) for m in own]))
        panels.append(f'<div class="panel" data-index="{i}">{"".join(body)}</div>')
    if not items:
        return "<p>The recipe ran no passes.</p>"
    return f'<ol id="timeline">{"".join(items)}</ol>{"".join(panels)}'


def render_report_html(result: Any, *, variants: Sequence[Variant] = (), title: str | None = None) -> str:
    """The full compile report of a :class:`~fxcompress.api.CompileResult` as one HTML page."""
    from fxcompress.version import __version__

    report = result.report
    snaps = result.snapshots.snapshots
    misses = why_not(result)
    title = title or f"fxcompress report: recipe {report.recipe}"
    sections = [
        f"<section id=\"summary\"><h2>Summary</h2>{_summary_cards(result, variants)}</section>",
        f"<section id=\"passes\"><h2>Passes ({len(report.records)} runs; click one to see its diff)</h2>{_timeline(result, misses)}</section>",
        f"<section id=\"histograms\"><h2>Op histogram: captured vs final</h2>{histogram_svg(snaps[0].histogram(), snaps[-1].histogram(), labels=('captured', 'final'))}</section>",
    ]
    if any(v.p50_ms is not None for v in variants):
        rows = [(v.label, v.provider or "-", f"{v.p50_ms:.3f}" if v.p50_ms is not None else "-",
                 f"{v.p90_ms:.3f}" if v.p90_ms is not None else "-", f"{v.size_bytes / 1e6:.3f}" if v.size_bytes else "-") for v in variants]
        sections.append(f'<section id="latency"><h2>Latency and size per variant</h2>{variants_svg(variants)}'
                        f'{_table(["variant", "provider", "p50 ms", "p90 ms", "size MB"], rows, (2, 3, 4))}</section>')
    else:
        sections.append('<section id="latency"><h2>Latency and size per variant</h2><p class="muted">No latency was measured for this report.</p></section>')
    layer_rows = layer_table_rows(result)
    if layer_rows:
        sections.append('<section id="layers"><h2>Per-layer precision and sparsity (final graph)</h2>'
                        + _table(["layer", "precision", "weight elements", "zero weights", "MACs"], layer_rows, (2, 3, 4)) + "</section>")
    if misses:
        rows = [(m.rule, m.pass_name, m.layer, m.node, m.reason) for items in misses.values() for m in items]
        sections.append('<section id="why-not"><h2>Why not? Near-misses of fusion rules</h2>'
                        + _table(["rule", "pass", "layer", "node", "reason"], rows) + "</section>")
    else:
        sections.append('<section id="why-not"><h2>Why not?</h2><p class="muted">No rule reported a near-miss.</p></section>')
    return _page(title, f"{len(report.records)} pass runs, {time.strftime('%Y-%m-%d %H:%M:%S')}, fxcompress {__version__}", sections)


def render_diff_html(diff: GraphDiff | OnnxDiff, *, title: str | None = None) -> str:
    """A standalone page for one diff (``fxcompress diff --html``)."""
    sections = [f'<section id="diff"><h2>Diff</h2>{diff_html(diff)}</section>',
                f'<section id="histograms"><h2>Op histogram</h2>{histogram_svg(diff.ops_before, diff.ops_after)}</section>']
    return _page(title or f"{diff.before} -> {diff.after}", "graph diff", sections)


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_HEAD_SCRIPT}</script></head>"
        f"<body><header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p><p id=\"js-status\">static (scripts have not run)</p>"
        f"<p id=\"js-errors\"></p></header><main>{''.join(sections)}</main><script>{_BODY_SCRIPT}</script></body></html>\n"
    )


def write_text(path: str | os.PathLike, page: str) -> Path:
    """Write a page (HTML, DOT, SVG) atomically: no half-written file on failure."""
    from fxcompress.export.atomic import write_atomically

    return write_atomically(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def write_report(path: str | os.PathLike, result: Any, *, variants: Sequence[Variant] = (), title: str | None = None) -> Path:
    """Render and atomically write the compile report of ``result`` to ``path``."""
    return write_text(path, render_report_html(result, variants=variants, title=title))
