"""Summarise the model-zoo sweeps' JSON-lines logs (tests/test_default_sweep.py, tests/test_prune_sweep.py)
as markdown, next to the logs themselves under benchmarks/results/sweeps/.

    FXCOMPRESS_SWEEP_LOG=default.jsonl pytest -m "slow or not slow" tests/test_default_sweep.py
    FXCOMPRESS_SWEEP_LOG=prune.jsonl pytest -m "slow or not slow" tests/test_prune_sweep.py
    python benchmarks/sweeps.py --default default.jsonl --prune prune.jsonl

The logs are copied in, and the summary is built from them only (no figure is typed by hand).
``fxcompress sweep`` logs kept here too (cli_default.jsonl: the same zoo through the CLI,
zoo_specs.txt; timm.jsonl) are summarised and compared with the test sweep's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_description  # noqa: E402
from benchmarks.report import machine_line, write_text  # noqa: E402
from fxcompress.sweeps.log import TrialLog  # noqa: E402
from fxcompress.sweeps.table import to_markdown  # noqa: E402
from tests import sweep_log  # noqa: E402
from tests.models import TOO_BIG  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "sweeps"


def _default_row(row: dict) -> dict:
    """A default-sweep row in one shape: the test sweep's older logs say ``name``/``ort_*``;
    ``fxcompress sweep`` records (what the test sweep now writes) say ``spec``/``parity_*``."""
    name = row.get("name") or row["spec"].rsplit(":", 1)[-1]
    failed = row.get("status", "ok") != "ok"
    return {"nodes_before": 0, "nodes_after": 0, "all_nodes_before": 0, "all_nodes_after": 0, "drift": float("nan"),
            "rolled_back": [], "passes_adding_nodes": [], **row, "name": name,
            "ort_passed": row.get("ort_passed", row.get("parity_passed", False)) and not failed,
            "ort_drift": row.get("ort_drift", row.get("parity_drift", float("nan")))}


def default_summary(rows: list[dict], title: str = "## `default` preset over the zoo (tests/test_default_sweep.py)") -> list[str]:
    """The default preset: nodes before/after, drift vs eager, ORT drift, per model."""
    rows = [_default_row(r) for r in rows]
    failed = [r["name"] for r in rows if r["rolled_back"] or r["passes_adding_nodes"] or not r.get("ort_passed", True)]
    before, after = sum(r["nodes_before"] for r in rows), sum(r["nodes_after"] for r in rows)
    lines = [
        title, "",
        f"{len(rows)} models ran; not run (too big for this machine): {', '.join(sorted(TOO_BIG))}. "
        f"Failed checks: {', '.join(failed) if failed else 'none'}. "
        f"Compute nodes {before} -> {after} ({100 * (before - after) / before:.1f}% fewer); "
        f"worst drift vs eager {max(r['drift'] for r in rows if r['drift'] == r['drift']):.1e}, worst ORT drift "
        f"{max(r.get('ort_drift', 0.0) for r in rows):.1e}; {sum(r['seconds'] for r in rows) / 60:.0f} min in all.", "",
        "| model | compute nodes | all nodes | drift vs eager | ORT drift | s |", "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["name"]):
        lines.append(f"| {r['name']} | {r['nodes_before']} -> {r['nodes_after']} | {r['all_nodes_before']} -> "
                     f"{r['all_nodes_after']} | {r['drift']:.1e} | {r.get('ort_drift', float('nan')):.1e} | {r['seconds']} |")
    return lines


def agreement(test_rows: list[dict], cli_rows: list[dict]) -> list[str]:
    """Per model run by both: the same verdict and the same graph sizes before and after?"""
    test = {r["name"]: r for r in map(_default_row, test_rows)}
    cli = {r["name"]: r for r in map(_default_row, cli_rows)}
    both = [n for n in cli if n in test]
    fields = ("nodes_before", "nodes_after", "all_nodes_before", "all_nodes_after", "ort_passed")
    differ = {n: [f for f in fields if test[n][f] != cli[n][f]] for n in both}
    differ = {n: f for n, f in differ.items() if f}
    lines = ["## `fxcompress sweep` against the test sweep's log", "",
             f"`fxcompress sweep --specs-file benchmarks/results/sweeps/zoo_specs.txt` (cli_default.jsonl) ran {len(cli)} of the "
             f"{len(test)} models of the test sweep's log (default.jsonl); on {len(both)} models run by both, "
             f"{len(both) - len(differ)} agree on the verdict and on compute and all node counts before and after."]
    if differ:
        lines += ["", "| model | differs in | test sweep | fxcompress sweep |", "|---|---|---|---|"]
        for name, what in sorted(differ.items()):
            lines.append(f"| {name} | {', '.join(what)} | {[test[name][f] for f in what]} | {[cli[name][f] for f in what]} |")
    missing = sorted(set(test) - set(cli))
    if missing:
        lines += ["", f"Not yet run through `fxcompress sweep` (a rerun of the same command resumes): {', '.join(missing)}."]
    return lines


def prune_summary(rows: list[dict]) -> list[str]:
    """prune vs Torch-Pruning: shrank and still ran, per model (peer null: not run yet)."""
    ours = {r["name"] for r in rows if r["ours"] and not r["error"]}
    compared = [r for r in rows if r["peer"] is not None]
    peer = {r["name"] for r in compared if r["peer"]}
    names = {r["name"] for r in compared}

    def listed(items: set[str]) -> str:
        return ", ".join(sorted(items)) or "none"

    lines = [
        "## `prune` (ratio 0.5) over the zoo vs Torch-Pruning (tests/test_prune_sweep.py)", "",
        f"{len(rows)} models ran; not run (too big for this machine): {', '.join(sorted(TOO_BIG))}. "
        f"fxcompress shrank, exported and matched its own module in ORT on **{len(ours)}/{len(rows)}**; "
        f"errors: {listed({r['name'] for r in rows if r['error']})}.", "",
        f"Torch-Pruning (MagnitudePruner, L1, ratio 0.5, last linear ignored; in a child process capped at 8 GiB "
        f"and 15 min) ran on {len(compared)} of them: it shrank and ran {len(peer)}/{len(compared)}, "
        f"fxcompress {len(ours & names)}/{len(compared)} of the same models.", "",
        f"- fxcompress only: {listed((ours & names) - peer)}",
        f"- Torch-Pruning only: {listed(peer - ours)}",
        f"- neither: {listed(names - ours - peer)}",
        f"- Torch-Pruning not run yet: {listed({r['name'] for r in rows} - names)}", "",
        "| model | fxcompress | s | Torch-Pruning | s |", "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["name"]):
        ours_cell = f"error: {r['error']}" if r["error"] else ("shrank" if r["ours"] else "skipped (reasons in report)")
        if r["peer"] is None:
            peer_cell = "not run yet"
        else:
            peer_cell = "shrank" if r["peer"] else f"no{': ' + r['peer_error'] if r.get('peer_error') else ''}"
        lines.append(f"| {r['name']} | {ours_cell} | {r['seconds']} | {peer_cell} | {r.get('peer_seconds', '-')} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--default", type=Path, help="JSON-lines log of tests/test_default_sweep.py")
    parser.add_argument("--prune", type=Path, help="JSON-lines log of tests/test_prune_sweep.py")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, source in (("default", args.default), ("prune", args.prune)):
        if source is not None and source.resolve() != (OUT / f"{kind}.jsonl").resolve():
            shutil.copyfile(source, OUT / f"{kind}.jsonl")
    lines = ["# Model-zoo sweeps", "",
             f"Summarised on: {machine_line(machine_description(), when=False)}. The logs are in this folder "
             "(default.jsonl, prune.jsonl); `python benchmarks/sweeps.py` rebuilds this file from them.", ""]
    for kind, summary in (("default", default_summary), ("prune", prune_summary)):
        log = OUT / f"{kind}.jsonl"
        if log.exists():
            lines += [*summary(list(sweep_log.read(log).values())), ""]
    cli_log, test_log = OUT / "cli_default.jsonl", OUT / "default.jsonl"
    for log, title in ((cli_log, "`fxcompress sweep` of the zoo, recipe default (cli_default.jsonl)"),
                       (OUT / "timm.jsonl", "timm models, recipe default (`fxcompress sweep`, timm.jsonl)")):
        if log.exists():  # the same table `fxcompress sweep --table` writes, rebuilt from the log alone
            write_text(log.with_suffix(".md"), to_markdown(list(TrialLog(log).read().values()), title))
    if cli_log.exists() and test_log.exists():
        lines += [*agreement(list(sweep_log.read(test_log).values()), list(sweep_log.read(cli_log).values())), ""]
    timm_log = OUT / "timm.jsonl"
    if timm_log.exists():
        lines += [*default_summary(list(sweep_log.read(timm_log).values()),
                                   "## `default` over the timm models (`fxcompress sweep`, timm.jsonl)"), ""]
    write_text(OUT / "README.md", "\n".join(lines))
    print(OUT / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
