"""Render benchmark results: results.json, a markdown table and a latency-vs-size plot, rebuilt
from the per-model JSON files (the documentation site quotes results.md as it is).

    python benchmarks/report.py [--out benchmarks/results]   # regenerate from the JSON only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fxcompress.export.atomic import write_atomically  # noqa: E402

HEADER = ["model", "batch", "variant", "p50 ms", "p90 ms", "speedup", "cosine", "top-1", "size MB", "ONNX nodes", "GMACs",
          "compile s", "ran on"]


def write_json(path: Path, data: Any) -> Path:
    """Atomic JSON write (a killed run never leaves a half-written result)."""
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str) + "\n"))


def write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every per-model record under ``out/models``, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted((out / "models").glob("*.json"))]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ran_on(row: dict[str, Any]) -> str:
    """Where the variant really ran, with any fallback spelled out."""
    where = row.get("provider") or "-"
    if row.get("fell_back"):
        where += " (FELL BACK)"
    placement = row.get("placement")
    if placement and placement.get("fell_back"):
        ops = ", ".join(f"{op} x{n}" for op, n in placement["fallback_ops"].items())
        where += f" ({ops} off {placement['requested']})"
    return where


def row_cells(row: dict[str, Any]) -> list[str]:
    if row["status"] != "ok":
        reason = (row.get("error") or "failed").replace("|", "/")
        return [row["model"], str(row["batch"]), row["variant"], f"failed: {reason}", *[""] * (len(HEADER) - 4)]
    speedup = row.get("speedup")
    macs = row.get("macs")
    return [
        row["model"], str(row["batch"]), row["variant"],
        _fmt(row.get("p50_ms"), ".2f"), _fmt(row.get("p90_ms"), ".2f"),
        ("-" if not speedup else f"{speedup:.2f}x" if speedup >= 0.01 else f"{speedup:.1e}x"),
        _fmt(row.get("cosine"), ".5f"), _fmt(row.get("top1"), ".3f"),
        _fmt(row.get("size_mb"), ".2f"), _fmt(row.get("onnx_nodes"), "d"), _fmt(macs / 1e9 if macs else None, ".3g"),
        _fmt(row.get("compile_s"), ".1f"), ran_on(row),
    ]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def console_table(rows: Sequence[dict[str, Any]]) -> str:
    """The same cells, aligned for a terminal/log."""
    cells = [HEADER] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells if i < len(c)) for i in range(3)]
    lines = []
    for c in cells:
        if c[3].startswith("failed"):
            lines.append("  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3])
        else:
            lines.append("  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + "  ".join(f"{x:>9}" for x in c[3:-1]) + "  " + c[-1])
    return "\n".join(lines)


def machine_line(machine: dict[str, Any], torch_threads: int | None = None, when: bool = True) -> str:
    """The machine and versions; ``when=False`` leaves out the git revision and date (for grouping)."""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    threads = f", torch eager on {torch_threads} thread(s)" if torch_threads else ""
    line = (f"{machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('ram_gib')} GiB RAM{gpu}{threads}; "
            f"torch {machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}, onnx {machine.get('onnx', '?')}")
    return f"{line}; git {machine.get('git')}; {machine.get('date')}" if when else line


def plot(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Latency (p50) against file size, one panel per model and batch, one marker per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no plot written", file=sys.stderr)
        return None
    panels = [r for r in records if any(row.get("p50_ms") and row.get("size_mb") for row in r["rows"])]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    width = max(5.2 * cols, 10.0)  # wide enough for the legend even with one panel
    fig, axes = plt.subplots(rows_n, cols, figsize=(width, 4.2 * rows_n + 1.0), squeeze=False)
    labels = sorted({row["variant"] for r in panels for row in r["rows"]})
    markers = "osD^v<>pPX*h"
    colors = plt.get_cmap("tab20")
    for ax, record in zip(axes.flat, panels):
        for row in record["rows"]:
            if not (row.get("p50_ms") and row.get("size_mb")):
                continue
            i = labels.index(row["variant"])
            ax.scatter(row["size_mb"], row["p50_ms"], marker=markers[i % len(markers)], color=colors(i % 20), s=46, label=row["variant"])
        ax.set_title(f"{record['model']} (batch {record['batch']}, {record['provider_requested']})", fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")  # variants span orders of magnitude (int8 ConvInteger vs fused int8)
        ax.set_xlabel("ONNX file size (MB)")
        ax.set_ylabel("p50 latency (ms)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    fig.suptitle("Latency vs size per recipe (ONNX Runtime; lower-left is better)", fontsize=11)
    legend_rows = (len(handles) + 3) // 4
    fig.tight_layout(rect=(0, min(0.5, (0.3 * legend_rows + 0.2) / fig.get_figheight()), 1, 0.96))
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def accuracy_table(accuracy: dict[str, Any]) -> str:
    """The digits accuracy table (benchmarks/accuracy.py's JSON)."""
    lines = [
        f"Digits CNN (scikit-learn digits, {accuracy['test_images']} test images), trained by the benchmark; "
        f"accuracy through ONNX Runtime ({accuracy['provider']}); command `{accuracy['command']}`.",
        "",
        "| variant | accuracy | change vs fp32 | size KB | status |",
        "|---|---|---|---|---|",
    ]
    base = accuracy.get("reference_accuracy")
    for row in accuracy["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['variant']} | - | - | - | failed: {(row.get('error') or '').replace('|', '/')} |")
            continue
        delta = f"{(row['accuracy'] - base) * 100:+.2f} pt" if base is not None else "-"
        lines.append(f"| {row['variant']} | {row['accuracy']:.2%} | {delta} | {row['size_kb']:.1f} | ok |")
    return "\n".join(lines)


def render(out: Path) -> dict[str, Any]:
    """Rebuild results.json, results.md and latency_vs_size.png under ``out``."""
    records = load_records(out)
    accuracy_file = out / "accuracy.json"
    accuracy = json.loads(accuracy_file.read_text()) if accuracy_file.exists() else None
    combined = {"records": records, "accuracy": accuracy}
    write_json(out / "results.json", combined)
    table = markdown_table([row for r in records for row in r["rows"]]) if records else "(no results)"
    md = ["# Benchmark results", ""]
    md += _coverage(records)
    for r in records:
        load = (f"; 1-min load {r['load_1min'][0]} -> {r['load_1min'][1]} on {r['machine'].get('cores')} cores while timing"
                if r.get("load_1min") else "")
        md.append(f"- {r['model']} batch {r['batch']}: `{r['command']}` ({r['seconds']} s; "
                  f"{machine_line(r['machine'], r.get('torch_threads'))}{load})")
    md += ["", table, ""]
    if accuracy:
        md += [accuracy_table(accuracy), ""]
    write_text(out / "results.md", "\n".join(md))
    plot(records, out / "latency_vs_size.png")
    return combined


def _coverage(records: Sequence[dict[str, Any]]) -> list[str]:
    """A line naming the models of the full set this table leaves out (it then shows a subset), or nothing."""
    import common  # the scripts' shared module (benchmarks/ is on sys.path for every script here)

    run = {r["model"] for r in records}
    missing = [m for m in common.FULL_SET if m not in run]
    if not records or not missing:
        return []
    return [f"A subset: {', '.join(sorted(run))}; not rerun with the current code (and so not shown): "
            f"{', '.join(missing)}. Each line below names the command and date of its model's run.", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the benchmark summary files from the JSON.")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    out = Path(parser.parse_args(argv).out)
    render(out)
    print(f"Rendered {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
