"""The per-pass table of a compile: each pass once per pipeline, with its rounds.

A pipeline repeated to a fixed point runs every pass several times; the table folds those runs
into one row (``rounds`` run, the rounds in which the pass changed the graph, node and parameter
counts from before its first run to after its last, total time, last drift). Stats are
summarised so a row stays one line: counts are added over the rounds, a list of per-layer
entries becomes "30 layers"; the full detail stays in the records (and the HTML report).

On a terminal the table is drawn with rich; elsewhere (pipes, files, CI logs) it is plain text
in aligned columns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import IO, Any, Sequence

from fxcompress.infra.instrument import PassRecord

COLUMNS = ("pass", "rounds", "changed in", "nodes", "params", "ms", "drift", "stats")
_RIGHT = {"rounds", "nodes", "params", "ms", "drift"}


@dataclass
class PassRow:
    """The runs of one pass in one pipeline, folded."""

    name: str
    runs: list[PassRecord] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return self.name.count("/")

    def cells(self) -> tuple[str, ...]:
        first, last = self.runs[0], self.runs[-1]
        changed = [str(r.iteration + 1) for r in self.runs if r.modified]
        nodes = f"{first.nodes_before}->{last.nodes_after}" if first.nodes_before is not None else "-"
        params = f"{first.params_before:,}->{last.params_after:,}" if first.params_before is not None else "-"
        seconds = [r.seconds for r in self.runs if r.seconds is not None]
        drifts = [r.drift for r in self.runs if r.drift is not None]
        label = "  " * self.depth + self.name.rsplit("/", 1)[-1]
        return (label, str(len(self.runs)), ",".join(changed) or "no", nodes, params,
                f"{sum(seconds) * 1000:.1f}" if seconds else "-", f"{drifts[-1]:.1e}" if drifts else "-",
                self.stats())

    def stats(self) -> str:
        rolled = [r for r in self.runs if r.rolled_back]
        if rolled:
            return f"ROLLED BACK: {rolled[-1].rolled_back}"
        return summarize_stats([r.stats for r in self.runs])


def summarize_stats(stats: Sequence[dict[str, Any]]) -> str:
    """One line for the stats of several runs: numbers added up, lists and tables counted."""
    merged: dict[str, Any] = {}
    for run in stats:
        for key, value in run.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                merged[key] = value
            else:
                merged[key] = merged.get(key, 0) + value
    parts = []
    for key, value in merged.items():
        if value in (0, None, False, {}, [], ()):
            continue
        if isinstance(value, (list, tuple, dict)):
            parts.append(f"{len(value)} {key}")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.3g}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def pass_rows(records: Sequence[PassRecord]) -> list[PassRow]:
    """Records folded into one row per pass per pipeline, in the order each first ran.

    A pipeline's own heading row comes before its first pass (name ``default/``'s prefix).
    """
    rows: dict[str, PassRow] = {}
    for record in records:
        rows.setdefault(record.name, PassRow(record.name)).runs.append(record)
    return list(rows.values())


def _pipelines(rows: Sequence[PassRow]) -> dict[int, str]:
    """Row index -> the nested pipeline that starts there (its heading is printed above the row)."""
    headings, seen = {}, set()
    for i, row in enumerate(rows):
        parts = row.name.split("/")[:-1]
        for depth in range(len(parts)):
            path = "/".join(parts[:depth + 1])
            if path not in seen:
                seen.add(path)
                headings.setdefault(i, path)
    return headings


def _lines(rows: Sequence[PassRow], total: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The table's data lines: pipeline headings, pass rows, then the total."""
    headings = _pipelines(rows)
    lines: list[tuple[str, ...]] = []
    for i, row in enumerate(rows):
        if i in headings:
            path = headings[i]
            lines.append(("  " * path.count("/") + f"[{path.rsplit('/', 1)[-1]}]", *[""] * (len(COLUMNS) - 1)))
        lines.append(row.cells())
    lines.append(total)
    return lines


def render_plain(rows: Sequence[PassRow], total: tuple[str, ...]) -> str:
    """The table as aligned plain text (the width of each column is that of its longest cell)."""
    lines = _lines(rows, total)
    widths = [max(len(COLUMNS[c]), *(len(line[c]) for line in lines)) for c in range(len(COLUMNS) - 1)]

    def fmt(cells: Sequence[str]) -> str:
        padded = [cell.rjust(w) if COLUMNS[c] in _RIGHT else cell.ljust(w) for c, (cell, w) in enumerate(zip(cells, widths))]
        return ("  ".join(padded) + "  " + cells[-1]).rstrip()

    header = fmt(COLUMNS)
    rule = "-" * max(len(header), min(120, max(len(fmt(line)) for line in lines)))
    return "\n".join([header, rule, *(fmt(line) for line in lines[:-1]), rule, fmt(lines[-1])])


def print_table(rows: Sequence[PassRow], total: tuple[str, ...], stream: IO[str] | None = None) -> None:
    """Print the table: drawn with rich on a terminal, plain aligned text otherwise."""
    stream = stream or sys.stdout
    if not getattr(stream, "isatty", lambda: False)():
        print(render_plain(rows, total), file=stream)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False, header_style="bold")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in _RIGHT else "left",
                         overflow="fold" if column == "stats" else "ellipsis", no_wrap=column != "stats")
    lines = _lines(rows, total)
    for line in lines[:-1]:
        table.add_row(*line, style="bold" if line[0].lstrip().startswith("[") else None)
    table.add_section()
    table.add_row(*lines[-1], style="bold")
    Console(file=stream).print(table)
