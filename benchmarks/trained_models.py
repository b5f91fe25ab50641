"""Trained models: every preset's task accuracy through ONNX Runtime against fp32, with ORT's quantizers.

The three models of ``fxcompress.examples.trained`` are TRAINED here, from fixed seeds, on
scikit-learn's bundled digits (no download): the digits CNN, a pre-LN transformer encoder over
variable-length sequences padded to 16 tokens with an attention mask, and a depthwise-separable
MobileNet-style CNN. For each: the fp32 export, every fxcompress preset that needs no training
(default, int8, int8-dynamic, fp16), ``prune`` as it is used (the model's prune options, then its
fine-tuning run on ``result.module``), and ONNX Runtime's ``quantize_static`` (QDQ, per-channel,
MinMax, U8S8) and ``quantize_dynamic`` on the same fp32 file with the same calibration batches.

Per variant: top-1 accuracy on the 450 held-out digits through ORT (CPU provider), change against
the fp32 file in points, file size, and latency (p50 at the model's batch, all variants of a model
interleaved in one process, ``runtime/timing.py``). Targets (issue 16): int8 / int8-dynamic within
0.5 point of fp32, prune + fine-tuning within 1 point.

    python benchmarks/trained_models.py                         # full: writes results/trained_models.{json,md}
    python benchmarks/trained_models.py --quick --out /tmp/tm   # CI dry run: tiny models, 1 epoch

A full run then also runs ``shipped_models.py`` (``--shipped``, default every shipped model that is
installed): networks trained for weeks whose weights packages ship, the sentence encoder
all-MiniLM-L6-v2 and the CRAFT text detector, beside ORT's quantizers (results/shipped_models.{json,md}).

A full run holds ``--timing-lock`` (default /tmp/fxcompress-timing.lock, the lock ``flock`` takes)
while it measures latency, and only then: training and compiling run beside other jobs, timings never.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fxcompress  # noqa: E402
from common import command_line, first_line, machine_description, quantize_ort_dynamic, quantize_ort_static, quiet  # noqa: E402
from fxcompress.examples.trained import TRAINED_MODELS, TrainedModel, prune_and_fine_tune_trained  # noqa: E402
from fxcompress.passes.presets import PRESETS  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import make_runner, time_interleaved  # noqa: E402

#: Presets compiled straight from the trained model (prune gets its fine-tuning row instead).
PRESET_ROWS = ("default", "int8", "int8-dynamic", "fp16")
#: Largest accuracy drop (points) the issue accepts, per variant.
TARGETS = {"fxcompress int8": 0.5, "fxcompress int8-dynamic": 0.5, "fxcompress prune + fine-tuning": 1.0}
#: Full runs: each factory's defaults. Quick runs: tiny models, one epoch (the dry run checks the plumbing).
QUICK = {"digits-cnn": dict(epochs=1, width=8, fine_tune_epochs=1),
         "digits-encoder": dict(epochs=1, width=32, depth=1, fine_tune_epochs=1),
         "digits-mobilenet": dict(epochs=1, width=8, fine_tune_epochs=1)}


def variants(trained: TrainedModel, work: Path) -> tuple[dict[str, Path], dict[str, str], dict[str, dict]]:
    """Build every variant's ONNX file: paths, errors and notes (compile seconds, prune stats) per label."""
    stem = work / trained.name
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    notes: dict[str, dict] = {}

    def build(label: str, make) -> None:
        start = time.perf_counter()
        try:
            with quiet():
                paths[label] = Path(make())
        except Exception as exc:  # noqa: BLE001 - a failing variant is a row with its reason
            errors[label] = first_line(exc)
        notes.setdefault(label, {})["build_s"] = time.perf_counter() - start

    build("fp32", lambda: fxcompress.compile(trained.model, trained.example, []).export_onnx(f"{stem}_fp32.onnx"))
    for preset in PRESET_ROWS:
        if preset in PRESETS:
            build(f"fxcompress {preset}", lambda preset=preset: fxcompress.compile(
                trained.model, trained.example, preset, calibration=trained.calibration).export_onnx(f"{stem}_{preset}.onnx"))

    def pruned() -> str:
        result = prune_and_fine_tune_trained(trained)
        stats = next(r.stats for r in result.report.records if r.name == "prune-channels")
        notes["fxcompress prune + fine-tuning"].update(
            ratio=trained.prune_options.get("ratio"), options=trained.prune_options, fine_tune=trained.fine_tune_label,
            macs=[stats["macs_before"], stats["macs_after"]], params=[stats["params_before"], stats["params_after"]],
            channels=stats["channels"])
        return result.export_onnx(f"{stem}_prune.onnx", tolerance=1e-4)

    notes["fxcompress prune + fine-tuning"] = {}
    build("fxcompress prune + fine-tuning", pruned)
    if "fp32" in paths:
        build("ORT quantize_static", lambda: quantize_ort_static(paths["fp32"], Path(f"{stem}_ort_static.onnx"), trained.calibration))
        build("ORT quantize_dynamic", lambda: quantize_ort_dynamic(paths["fp32"], Path(f"{stem}_ort_dynamic.onnx")))
    return paths, errors, notes


@contextlib.contextmanager
def timing_lock(path: str | None):
    """Hold an exclusive ``flock`` on ``path`` (no lock when empty): no two timing runs overlap."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def score_model(trained: TrainedModel, train_s: float, work: Path) -> tuple[list[dict], dict[str, Path]]:
    """Every variant of one model, scored (accuracy, size); returns the rows and the files to time."""
    paths, errors, notes = variants(trained, work)
    reference = trained.onnx_accuracy(paths["fp32"]) if "fp32" in paths else None
    rows = []
    for label in [*paths, *errors]:
        row = {"model": trained.name, "variant": label, "weights": "trained", "train_s": train_s, **notes.get(label, {})}
        if label in errors:
            rows.append({**row, "status": "failed", "error": errors[label]})
            print(f"{trained.name:18s} {label:32s} failed: {errors[label]}", flush=True)
            continue
        accuracy = trained.onnx_accuracy(paths[label])
        row.update(status="ok", accuracy=accuracy, size_kb=os.path.getsize(paths[label]) / 1024)
        if reference is not None:
            row["delta_points"] = 100 * (accuracy - reference)
            if label in TARGETS:
                row["target_points"] = TARGETS[label]
                row["within_target"] = -row["delta_points"] <= TARGETS[label] + 1e-9
        rows.append(row)
        print(f"{trained.name:18s} {label:32s} acc {accuracy:.4f} ({row.get('delta_points', 0):+.2f} pt) "
              f"{row['size_kb']:.0f} KB", flush=True)
    return rows, paths


def time_model(trained: TrainedModel, paths: dict[str, Path], rows: list[dict], rounds: int, threads: int) -> None:
    """Latency of one model's variants, interleaved; fills ``p50_ms`` and ``speedup`` (vs fp32) in ``rows``."""
    runners = {label: make_runner(create_session(path, "cpu", threads=threads), trained.example) for label, path in paths.items()}
    timing = time_interleaved(runners, rounds=rounds, block=8, batch_size=trained.batch)
    for row in rows:
        if row["status"] == "ok":
            row.update(p50_ms=timing[row["variant"]]["p50_ms"], speedup=timing["fp32"]["p50_ms"] / timing[row["variant"]]["p50_ms"])
            print(f"{trained.name:18s} {row['variant']:32s} p50 {row['p50_ms']:.3f} ms x{row['speedup']:.2f}", flush=True)


def _note(r: dict) -> str:
    parts = []
    if "macs" in r:
        overrides = (r.get("options") or {}).get("overrides")
        parts.append(f"ratio {r['ratio']}{f' (overrides {overrides})' if overrides else ''}, MACs {r['macs'][1] / r['macs'][0]:.0%} and params "
                     f"{r['params'][1] / r['params'][0]:.0%} of fp32; fine-tune {r['fine_tune']}")
    if "target_points" in r:
        parts.append(f"target drop <= {r['target_points']} pt: {'met' if r['within_target'] else 'MISSED'}")
    return "; ".join(parts)


def header(title: str, description: str, record: dict) -> list[str]:
    """A results table's opening lines: title, what the figures are, the command and the machine."""
    machine = record["machine"]
    return [
        f"# {title}",
        "",
        description,
        "",
        f"Command: `{record['command']}`  ",
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; torch {machine.get('torch')}, onnxruntime "
        f"{machine.get('onnxruntime')}; git {machine.get('git')}; {machine.get('date')}; {record['seconds']:.0f} s in all.",
        "",
    ]


def render(record: dict) -> str:
    lines = header(
        "Trained models: accuracy through ONNX Runtime, every preset and ORT's quantizers",
        "Every figure here comes from models TRAINED by the benchmark (fixed seeds) on scikit-learn's bundled digits: "
        f"accuracy on the {record['test_images']} held-out images through ORT's CPU provider, change against the fp32 "
        f"file in points, file size, p50 latency at the model's batch ({record['threads']} ORT intra-op thread(s), "
        f"variants of a model interleaved, {record['rounds']} rounds x 8 runs, under the timing lock). Real trained "
        "networks that packages ship (a sentence encoder, a text detector): benchmarks/shipped_models.py.",
        record) + [
        "| model | variant | accuracy | vs fp32 | size KB | p50 ms | speedup | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        delta = f"{r['delta_points']:+.2f} pt" if "delta_points" in r else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['accuracy']:.2%} | {delta} | {r['size_kb']:.0f} | "
                     f"{r['p50_ms']:.3f} | {r['speedup']:.2f}x | {_note(r)} |")
    models = {}
    for r in record["rows"]:
        models.setdefault(r["model"], r)
    lines += ["", "Models (batch, training): " + "; ".join(
        f"{name}: {record['models'][name]['description']}" for name in models if name in record["models"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one epoch, one timing round (CI dry run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--models", default=",".join(TRAINED_MODELS), help="comma-separated subset of " + ", ".join(TRAINED_MODELS))
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10; --quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency column")
    parser.add_argument("--timing-lock", default=None,
                        help="file locked while timing (default /tmp/fxcompress-timing.lock; --quick: none; '' for none)")
    parser.add_argument("--shipped", default=None,
                        help="shipped trained models run after the digits models by shipped_models.py (comma-separated; "
                             "default: every installed one; --quick: none; '' for none)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRAINED_MODELS]
    if unknown:
        print(f"error: unknown model(s) {unknown}; known: {', '.join(TRAINED_MODELS)}", file=sys.stderr)
        return 2
    # Training runs on a fixed thread count: float reduction order (so the trained weights) depends on it.
    torch.set_num_threads(2)
    rounds = args.rounds or (1 if args.quick else 10)
    lock = args.timing_lock if args.timing_lock is not None else (None if args.quick else "/tmp/fxcompress-timing.lock")
    command = command_line()
    print(f"command: {command}\nmachine: {json.dumps(machine_description('CPUExecutionProvider'))}", flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    models: dict[str, dict] = {}
    test_images = None
    scored: list[tuple[TrainedModel, dict[str, Path], list[dict]]] = []
    with tempfile.TemporaryDirectory(prefix="fxcompress-trained-") as folder:
        for name in names:
            kwargs = QUICK[name] if args.quick else {}
            begin = time.perf_counter()
            trained = TRAINED_MODELS[name](**kwargs)
            train_s = time.perf_counter() - begin
            test_images = len(trained.y_test)
            models[name] = {"kwargs": kwargs, "train_s": train_s, "batch": trained.batch,
                            "description": f"batch {trained.batch}, {type(trained.model).__name__}"
                                           f"({', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'defaults'}) trained in {train_s:.0f} s"}
            print(f"== {name}: trained in {train_s:.1f} s, PyTorch accuracy {trained.torch_accuracy(trained.model):.4f}", flush=True)
            model_rows, paths = score_model(trained, train_s, Path(folder))
            scored.append((trained, paths, model_rows))
            rows += model_rows
        # Training, compiling and scoring ran beside other jobs; latency alone holds the timing lock.
        with timing_lock(lock):
            for trained, paths, model_rows in scored:
                time_model(trained, paths, model_rows, rounds, args.threads)
    record = {"command": command, "quick": args.quick, "threads": args.threads, "rounds": rounds,
              "test_images": test_images, "seconds": time.perf_counter() - start,
              "machine": machine_description("CPUExecutionProvider"), "models": models, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trained_models.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    table = render(record)
    (args.out / "trained_models.md").write_text(table)
    print(table)
    return _run_shipped(args, rounds, lock)


def _run_shipped(args: argparse.Namespace, rounds: int, lock: str | None) -> int:
    """The real trained networks of ``shipped_models.py`` (its runners, its table) after the digits models."""
    import shipped_models

    from fxcompress.examples import shipped

    if args.shipped is None:
        names = [] if args.quick else [n for n in shipped.SHIPPED_MODELS if shipped.available(n)]
    else:
        names = [n.strip() for n in args.shipped.split(",") if n.strip()]
    if not names:
        return 0
    return shipped_models.main(["--models", ",".join(names), "--out", str(args.out), "--rounds", str(min(rounds, 6)),
                                "--threads", str(args.threads), "--timing-lock", lock or ""])


if __name__ == "__main__":
    raise SystemExit(main())
