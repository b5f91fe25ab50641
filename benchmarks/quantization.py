"""fxcompress int8 vs ONNX Runtime's own quantizers, side by side in one process.

    python benchmarks/quantization.py                       # all models, 10 rounds
    python benchmarks/quantization.py --models resnet50 --rounds 4

Per model: the plain fp32 export, fxcompress's int8 preset(s), and ORT's quantizer on the same fp32
export (CNNs: ``quantize_static`` at its fastest x86 setting: QDQ, per-channel, MinMax, uint8
activations + int8 weights, after ``quant_pre_process``; BERT: ``quantize_dynamic``). All sessions
use the CPU provider with ORT's default thread spinning; latency is timed interleaved (blocks of
runs of each variant in turn, docs/design.md "How to time"). Accuracy is the cosine similarity between
each variant's output and the fp32 ONNX output on held-out random inputs (minimum over them).
"Kernels" counts the Conv/Gemm/MatMul nodes in ORT's optimized graph that still run in float.

Writes benchmarks/results/quantization.md and .json with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxcompress  # noqa: E402
from fxcompress.export.onnx_export import export_model_proto  # noqa: E402
from fxcompress.numerics import compare_output  # noqa: E402
from fxcompress.passes.presets import int8  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import make_runner, time_interleaved  # noqa: E402
from tests.models import randomize_bn  # noqa: E402

FLOAT_MATRIX_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def machine() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def build_model(name: str):
    """(model, example inputs, calibration batches, held-out inputs) for ``name``."""
    g = torch.Generator().manual_seed(0)
    if name in ("resnet50", "mobilenet_v2"):
        import torchvision

        torch.manual_seed(0)
        model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
        shape = (1, 3, 224, 224)
        make = lambda: (torch.randn(shape, generator=g),)  # noqa: E731
    elif name == "bert":
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(num_hidden_layers=4, hidden_size=384, num_attention_heads=6, intermediate_size=1536)
        model = BertModel(config).eval()
        make = lambda: (torch.randint(0, config.vocab_size, (1, 128), generator=g),)  # noqa: E731
    else:
        raise SystemExit(f"unknown model {name}")
    example = make()
    calibration = [make() for _ in range(16)]
    held_out = [make() for _ in range(8)]
    return model, example, calibration, held_out


class _Reader:
    """ORT CalibrationDataReader over our calibration batches."""

    def __init__(self, names, batches):
        self.items = iter([{n: t.numpy() for n, t in zip(names, b)} for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(fp32: onnx.ModelProto, kind: str, calibration, workdir: Path) -> tuple[onnx.ModelProto, float]:
    """ORT's quantizer on the fp32 export; returns the model and the quantizer's wall time (s)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_dynamic, quantize_static)

    src, pre, out = workdir / "fp32.onnx", workdir / "pre.onnx", workdir / f"ort_{kind}.onnx"
    onnx.save(fp32, str(src))
    start = time.perf_counter()
    if kind == "static":
        quant_pre_process(str(src), str(pre))
        names = [i.name for i in fp32.graph.input]
        quantize_static(str(pre), str(out), _Reader(names, calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    else:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - start
    return onnx.load(str(out)), seconds


def float_kernels(model: onnx.ModelProto, workdir: Path, label: str) -> tuple[int, dict[str, int]]:
    """Conv/Gemm/MatMul nodes left in float in ORT's optimized graph, and the op histogram."""
    path = workdir / f"{label.replace(' ', '_')}_optimized.onnx"
    create_session(model, "cpu", optimized_model_path=path)
    ops: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return sum(v for k, v in ops.items() if k in FLOAT_MATRIX_OPS), ops


def cosine_vs(reference, model: onnx.ModelProto, held_out) -> float:
    session = create_session(model, "cpu")
    worst = 1.0
    for feed, ref in zip(held_out, reference):
        worst = min(worst, compare_output(0, ref, session.run(feed)[0]).cosine)
    return worst


def run_model(name: str, rounds: int, workdir: Path) -> list[dict]:
    model, example, calibration, held_out = build_model(name)
    fp32_result = fxcompress.compile(model, example, [])
    fp32, _ = export_model_proto(fp32_result.module, example)
    fp32_session = create_session(fp32, "cpu")
    reference = [fp32_session.run(feed)[0] for feed in held_out]
    variants: dict[str, dict] = {"fp32 (plain export)": {"model": fp32, "compile_s": None}}
    presets = {"int8": "int8"} if name != "bert" else {"int8-dynamic": "int8-dynamic", "int8": "int8"}
    if name != "bert":  # what the stem rewrite alone is worth, in the same run
        presets["int8 without conv-space-to-depth"] = int8().set_options("conv-space-to-depth", {"max_in_channels": 0})
    for label, preset in presets.items():
        start = time.perf_counter()
        result = fxcompress.compile(model, example, preset, calibration=calibration)
        proto, _ = export_model_proto(result.module, example)
        seconds = time.perf_counter() - start
        variants[f"fxcompress {label}"] = {"model": proto, "compile_s": seconds, "torch_drift": result.report.drift}
    peer_kind = "dynamic" if name == "bert" else "static"
    peer, peer_s = ort_quantize(fp32, peer_kind, calibration, workdir)
    variants[f"ORT quantize_{peer_kind}"] = {"model": peer, "compile_s": peer_s}
    runners = {}
    for label, v in variants.items():
        v["float_matrix_ops"], v["ops"] = float_kernels(v["model"], workdir, f"{name}_{label}")
        v["cosine"] = 1.0 if label.startswith("fp32") else cosine_vs(reference, v["model"], held_out)
        v["size_mb"] = v["model"].ByteSize() / 1e6
        runners[label] = make_runner(create_session(v["model"], "cpu"), example)
    timing = time_interleaved(runners, rounds=rounds, block=8)
    peer_ms = timing[f"ORT quantize_{peer_kind}"]["p50_ms"]
    rows = []
    for label, v in variants.items():
        rows.append({
            "model": name, "variant": label, "p50_ms": timing[label]["p50_ms"], "p90_ms": timing[label]["p90_ms"],
            "vs_peer": timing[label]["p50_ms"] / peer_ms, "cosine_vs_fp32": v["cosine"],
            "float_matrix_ops": v["float_matrix_ops"], "size_mb": v["size_mb"],
            "compile_s": v["compile_s"], "torch_drift": v.get("torch_drift"), "ops": v["ops"],
        })
    return rows


def write_results(rows: list[dict], command: str, rounds: int) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "machine": machine(), "rounds": rounds, "block": 8,
            "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "quantization.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    lines = [
        "# int8: fxcompress vs ONNX Runtime's quantizers",
        "",
        f"Command: `{command}`  ",
        f"Machine: {meta['machine']}; onnxruntime {meta['onnxruntime']}, torch {meta['torch']}; {meta['date']}  ",
        f"Batch 1, ORT CPU provider, default thread spinning, interleaved {rounds} rounds x 8 runs per variant. "
        "Cosine: minimum over 8 held-out random inputs vs the fp32 ONNX output. Float matrix ops: Conv/Gemm/MatMul "
        "left in float in ORT's optimized graph. Compile: fxcompress compile+calibration+export vs ORT's quantizer "
        "(quant_pre_process + quantize_static, or quantize_dynamic).",
        "",
        "| model | variant | p50 ms | p90 ms | vs ORT quantizer | cosine vs fp32 | float matrix ops | size MB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['vs_peer']:.2f}x | "
                     f"{r['cosine_vs_fp32']:.5f} | {r['float_matrix_ops']} | {r['size_mb']:.1f} | {compile_s} |")
    (out / "quantization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "bert"])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    command = "python benchmarks/quantization.py " + " ".join(sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"== {name}", flush=True)
            rows += run_model(name, args.rounds, Path(tmp))
    write_results(rows, command.strip(), args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
