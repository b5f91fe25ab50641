"""Trained transformer encoder: fxcompress int8 / int8-dynamic vs ONNX Runtime's quantizers, same fp32 file.

The digits encoder (fxcompress.examples.digits_encoder: padded 2x2-patch token sequences with an
attention mask, pre-LN blocks, masked mean pooling) is trained here on scikit-learn's digits; a
wider configuration is randomly initialised then trained the same way. Each model is also run
"with outlier channels": the same function with two LayerNorm output channels 30x larger, the
shape trained large transformers have and a seconds-trained encoder lacks (exact in fp32).

Per variant: top-1 accuracy through ORT (CPU), embedding cosine against the fp32 file (min and
mean over the test set), file size and latency at batch 16 (interleaved in one process).
fxcompress int8-dynamic is run with the calibration data (it then smooths activations first) and
without (as it needs none).

    flock /tmp/fxcompress-timing.lock python benchmarks/trained_encoder.py          # full
    python benchmarks/trained_encoder.py --quick --out /tmp/te                       # CI dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fxcompress  # noqa: E402
from common import command_line, first_line, machine_description, quantize_ort_dynamic, quantize_ort_static, quiet  # noqa: E402
from fxcompress.examples.digits_encoder import (  # noqa: E402
    DigitsEncoder, load_digits_sequences, onnx_encoder_outputs, train_encoder, with_channel_outliers,
)
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import make_runner, time_interleaved  # noqa: E402

BATCH = 16
CONFIGS = {"digits-encoder": dict(width=64, depth=3, heads=4, embedding=64),
           "digits-encoder-wide": dict(width=192, depth=4, heads=6, embedding=128)}
#: Training epochs per configuration (the wide one costs ~8x more per epoch on 2 cores).
EPOCHS = {"digits-encoder": 20, "digits-encoder-wide": 8}


#: ORT's kernels for matrix products: int8 ones, and the float ones an int8 model should not fall back to.
INT8_KERNELS = ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger")
FLOAT_KERNELS = ("Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def ort_kernels(path: Path) -> dict[str, int]:
    """Matrix-product and Q/DQ node counts of the graph ORT really runs (after its fusions)."""
    optimized = path.with_suffix(".ort.onnx")
    create_session(path, "cpu", optimized_model_path=optimized)
    counts = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return {op: counts[op] for op in (*INT8_KERNELS, *FLOAT_KERNELS, "QuantizeLinear", "DequantizeLinear") if counts[op]}


def _kernel_summary(kernels: dict[str, int]) -> str:
    int8 = sum(kernels.get(op, 0) for op in INT8_KERNELS)
    floats = sum(kernels.get(op, 0) for op in FLOAT_KERNELS)
    qdq = kernels.get("QuantizeLinear", 0) + kernels.get("DequantizeLinear", 0)
    return f"{int8} / {floats} / {qdq}"


def run_model(name: str, model: DigitsEncoder, data, work: Path, rounds: int, threads: int) -> list[dict]:
    example = (data.tokens_train[:BATCH], data.mask_train[:BATCH])
    calibration = [(data.tokens_train[i:i + BATCH], data.mask_train[i:i + BATCH]) for i in range(0, 256, BATCH)]
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    compile_s: dict[str, float] = {}
    fp32 = fxcompress.compile(model, example, []).export_onnx(work / f"{name}_fp32.onnx")
    paths["fp32"] = Path(fp32)
    # int8-dynamic as users call it (no data) and with calibration data (it then smooths activations too)
    for label, preset, data_given in (("fxcompress int8", "int8", calibration),
                                      ("fxcompress int8-dynamic", "int8-dynamic", calibration),
                                      ("fxcompress int8-dynamic, no calibration", "int8-dynamic", None)):
        start = time.perf_counter()
        try:
            with quiet():
                result = fxcompress.compile(model, example, preset, calibration=data_given, tolerance=1.0)
                paths[label] = Path(result.export_onnx(work / f"{name}_{label.replace(' ', '_').replace(',', '')}.onnx"))
        except Exception as exc:  # noqa: BLE001 - a failing variant is a row with its reason
            errors[label] = first_line(exc)
        compile_s[label] = time.perf_counter() - start
    for label, make in (("ORT quantize_static", lambda p: quantize_ort_static(paths["fp32"], p, calibration)),
                        ("ORT quantize_dynamic", lambda p: quantize_ort_dynamic(paths["fp32"], p))):
        start = time.perf_counter()
        try:
            paths[label] = Path(make(work / f"{name}_{label.split()[-1]}.onnx"))
        except Exception as exc:  # noqa: BLE001
            errors[label] = first_line(exc)
        compile_s[label] = time.perf_counter() - start
    ref_logits, ref_embedding = onnx_encoder_outputs(paths["fp32"], data.tokens_test, data.mask_test, BATCH)
    runners = {label: make_runner(create_session(path, "cpu", threads=threads), example) for label, path in paths.items()}
    timing = time_interleaved(runners, rounds=rounds, block=10, batch_size=BATCH)
    rows = []
    for label in [*paths, *errors]:
        if label in errors:
            rows.append({"model": name, "variant": label, "status": "failed", "error": errors[label]})
            continue
        logits, embedding = onnx_encoder_outputs(paths[label], data.tokens_test, data.mask_test, BATCH)
        cos = torch.nn.functional.cosine_similarity(embedding, ref_embedding, dim=1)
        rows.append({
            "model": name, "variant": label, "status": "ok",
            "accuracy": float((logits.argmax(1) == data.y_test).float().mean()),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "size_kb": os.path.getsize(paths[label]) / 1024, "ort_kernels": ort_kernels(paths[label]),
            "p50_ms": timing[label]["p50_ms"], "speedup": timing["fp32"]["p50_ms"] / timing[label]["p50_ms"],
            **({"compile_s": compile_s[label]} if label in compile_s else {}),
        })
        print(f"{name:34s} {label:22s} acc {rows[-1]['accuracy']:.4f} cos min {rows[-1]['cosine_min']:.4f} "
              f"mean {rows[-1]['cosine_mean']:.4f} p50 {rows[-1]['p50_ms']:.3f} ms x{rows[-1]['speedup']:.2f}", flush=True)
    return rows


def write(rows: list[dict], out: Path, command: str, threads: int, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "batch": BATCH, "threads": threads, "seconds": seconds,
              "machine": machine_description("CPUExecutionProvider"), "rows": rows}
    (out / "trained_encoder.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Trained transformer encoder: int8 through ONNX Runtime", "",
             f"Command: `{command}`; batch {BATCH}, ORT CPU, {threads} intra-op thread(s); accuracy on the "
             "450 held-out digits; cosine of the pooled embedding against the fp32 file.", "",
             "ORT kernels: int8 / float matrix products and Q/DQ nodes left in the graph ORT runs.", "",
             "| model | variant | accuracy | cosine min | cosine mean | size KB | p50 ms | speedup | ORT kernels |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['accuracy']:.2%} | {r['cosine_min']:.4f} | {r['cosine_mean']:.4f} "
                     f"| {r['size_kb']:.0f} | {r['p50_ms']:.3f} | {r['speedup']:.2f}x | {_kernel_summary(r['ort_kernels'])} |")
    (out / "trained_encoder.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few epochs and rounds (CI dry run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    data = load_digits_sequences()
    rounds = args.rounds or (1 if args.quick else 10)
    configs = {"digits-encoder": CONFIGS["digits-encoder"]} if args.quick else CONFIGS
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fxcompress-encoder-") as folder:
        for name, config in configs.items():
            torch.manual_seed(0)
            model = train_encoder(DigitsEncoder(**config), data, epochs=2 if args.quick else EPOCHS[name])
            rows += run_model(name, model, data, Path(folder), rounds, args.threads)
            rows += run_model(f"{name} + outlier channels", with_channel_outliers(copy.deepcopy(model)), data,
                              Path(folder), rounds, args.threads)
    write(rows, args.out, command_line(), args.threads, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
