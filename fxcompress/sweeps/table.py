"""The sweep's table: one row per trial (status, parity, size, MACs, latency vs plain export),
as markdown or a self-contained HTML page."""

from __future__ import annotations

import html
from typing import Sequence

COLUMNS = ("model", "recipe", "status", "parity vs original", "nodes", "MACs", "ONNX size", "p50 vs plain export", "s")


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}".strip()
    return f"{value:g} {unit}".strip()


def _status(record: dict) -> str:
    status = record.get("status", "?")
    if status == "ok":
        return "ok"
    reason = " ".join(str(record.get("error") or "").split())
    kind = record.get("error_type")
    detail = f"{kind}: {reason}" if kind else reason
    return f"{status}: {detail[:160]}" if detail else status


def row(record: dict) -> list[str]:
    """The table cells of one trial record."""
    parity = "-"
    if record.get("parity_drift") is not None:
        parity = f"{'pass' if record.get('parity_passed') else 'FAIL'} ({record['parity_drift']:.1e})"
    nodes = f"{record['nodes_before']} -> {record['nodes_after']}" if "nodes_after" in record else "-"
    macs = f"{_number(record['macs_before'])} -> {_number(record['macs_after'])}" if "macs_after" in record else "-"
    size = _number(record.get("onnx_bytes"), "B")
    if record.get("plain_onnx_bytes"):
        size += f" (plain {_number(record['plain_onnx_bytes'], 'B')})"
    latency = "-"
    if record.get("p50_ms") is not None:
        latency = f"{record['p50_ms']:.3g} vs {record['plain_p50_ms']:.3g} ms ({record['speedup']:.2f}x, {record.get('provider')})"
    name = record.get("spec", record.get("key", "?"))
    return [name, record.get("recipe", "-"), _status(record), parity, nodes, macs, size, latency, str(record.get("seconds", "-"))]


def status_line(records: Sequence[dict]) -> str:
    """One line: how many trials ended in which status."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.get("status", "?")] = counts.get(record.get("status", "?"), 0) + 1
    return f"{len(records)} trials: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def to_markdown(records: Sequence[dict], title: str = "Sweep") -> str:
    """The trials as a markdown table under ``title``, with a status line."""
    lines = [f"# {title}", "", status_line(records), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for record in records:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row(record)) + " |")
    return "\n".join(lines) + "\n"


def to_html(records: Sequence[dict], title: str = "Sweep") -> str:
    """The trials as a self-contained HTML page (failed rows tinted)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for record in records:
        tint = "" if record.get("status") == "ok" else ' style="background:#fde8e8"'
        body.append(f"<tr{tint}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row(record)) + "</tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
            "font-size:13px;text-align:left}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(status_line(records))}</p>"
            f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>\n")
