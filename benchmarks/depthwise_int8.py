"""int8 on depthwise networks: fxcompress vs ONNX Runtime's quantize_static, and a trained digits MobileNet.

    python benchmarks/depthwise_int8.py                  # EfficientNet-B0, MobileNetV3-L at 224; digits MobileNet
    python benchmarks/depthwise_int8.py --quick          # 64x64 MobileNetV3 only, 2 rounds, few epochs (CI dry run)

Part 1 (RANDOM WEIGHTS): timm ``efficientnet_b0`` and ``mobilenetv3_large_100``, random init with
randomized batch-norm statistics (``tests.models.randomize_bn``; ``--uneven`` adds the
``uneven_bn`` stress variant, per-channel gains spread over orders of magnitude). Variants:
the plain fp32 export, fxcompress ``int8`` (default, space-to-depth, equalize-layers,
quantize-int8, correct-bias), the same without equalize-layers and correct-bias (what they are
worth, in the same run), and ORT ``quantize_static`` on the same fp32 export with the same
calibration data (QDQ, per-channel, MinMax, U8S8, after quant_pre_process). Cosine: minimum over
held-out random inputs against the fp32 ONNX output; latency interleaved (runtime/timing.py).

Part 2 (TRAINED): ``DigitsMobileNet`` (depthwise-separable) trained here on scikit-learn's digits,
every preset's test accuracy through ORT against fp32 (prune as used: then fine-tuned), and ORT's
quantizers. Writes benchmarks/results/depthwise_int8.{json,md} with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import quantization  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.export.onnx_export import export_model_proto  # noqa: E402
from fxcompress.infra.recipe import PassStep  # noqa: E402
from fxcompress.passes.presets import int8  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import make_runner, time_interleaved  # noqa: E402
from tests.models import randomize_bn, uneven_bn  # noqa: E402

PEER = "ORT quantize_static"


def _without(*names: str):
    recipe = int8()
    recipe.steps = [s for s in recipe.steps if not (isinstance(s, PassStep) and s.name in names)]
    recipe.name = f"int8 without {' and '.join(names)}"
    return recipe


def build(name: str, size: int, bn: str, calibration_count: int, held_out_count: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    (uneven_bn if bn == "uneven" else randomize_bn)(model)
    g = torch.Generator().manual_seed(0)
    make = lambda: (torch.randn(1, 3, size, size, generator=g),)  # noqa: E731
    example = make()
    return model.eval(), example, [make() for _ in range(calibration_count)], [make() for _ in range(held_out_count)]


def run_model(name: str, size: int, bn: str, rounds: int, calibration_count: int, held_out_count: int,
              workdir: Path) -> list[dict]:
    model, example, calibration, held_out = build(name, size, bn, calibration_count, held_out_count)
    fp32, _ = export_model_proto(fxcompress.compile(model, example, []).module, example)
    fp32_session = create_session(fp32, "cpu")
    reference = [fp32_session.run(feed)[0] for feed in held_out]
    variants: dict[str, dict] = {"fp32 (plain export)": {"model": fp32, "compile_s": None}}
    for label, recipe in {"fxcompress int8": int8(),
                          "fxcompress int8 without equalize-layers, correct-bias": _without("equalize-layers", "correct-bias")}.items():
        start = time.perf_counter()
        try:
            with common.quiet():
                result = fxcompress.compile(model, example, recipe, calibration=calibration, tolerance=float("inf"))
            proto, _ = export_model_proto(result.module, example)
        except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not a crash
            variants[label] = {"error": common.first_line(exc)}
            continue
        stats = {r.name: r.stats for r in result.report.records if r.name in ("equalize-layers", "correct-bias")}
        variants[label] = {"model": proto, "compile_s": time.perf_counter() - start, "torch_drift": result.report.drift,
                           "within_int8_tolerance": result.report.drift <= int8().tolerance,
                           "pass_stats": {k: {s: v for s, v in st.items() if not isinstance(v, (list, dict))}
                                          for k, st in stats.items()}}
    peer, peer_s = quantization.ort_quantize(fp32, "static", calibration, workdir)
    variants[PEER] = {"model": peer, "compile_s": peer_s}
    runners = {}
    for label, v in variants.items():
        if "model" not in v:
            continue
        v["cosine"] = 1.0 if label.startswith("fp32") else quantization.cosine_vs(reference, v["model"], held_out)
        v["float_matrix_ops"], _ = quantization.float_kernels(v["model"], workdir, f"{name}_{label}")
        runners[label] = make_runner(create_session(v["model"], "cpu"), example)
    timing = time_interleaved(runners, rounds=rounds, block=8)
    peer_ms = timing[PEER]["p50_ms"]
    rows = []
    for label, v in variants.items():
        row = {"model": name, "input": size, "bn": bn, "weights": "random", "variant": label}
        if "model" not in v:
            rows.append({**row, "status": "failed", "error": v["error"]})
            continue
        rows.append({**row, "status": "ok", "p50_ms": timing[label]["p50_ms"], "p90_ms": timing[label]["p90_ms"],
                     "vs_peer": timing[label]["p50_ms"] / peer_ms, "cosine_vs_fp32": v["cosine"],
                     "float_matrix_ops": v["float_matrix_ops"], "compile_s": v["compile_s"],
                     **{k: v[k] for k in ("torch_drift", "within_int8_tolerance", "pass_stats") if k in v}})
        print(f"  {label}: {rows[-1].get('p50_ms', 0):.2f} ms, cosine {v['cosine']:.5f}", flush=True)
    return rows


def digits_accuracy(epochs: int, width: int, presets: list[str], workdir: Path) -> dict:
    """Every preset's accuracy through ORT on the trained DigitsMobileNet (TRAINED weights)."""
    from fxcompress.examples.digits import (DigitsMobileNet, load_digits_data, onnx_accuracy, prune_and_fine_tune,
                                            torch_accuracy, train)

    data = load_digits_data()
    start = time.perf_counter()
    model = train(DigitsMobileNet(width=width), data, epochs=epochs)
    train_s = time.perf_counter() - start
    example = (data.x_train[:1],)
    calibration = [(data.x_train[i:i + 1],) for i in range(0, 16 * 16, 16)]  # training images only
    rows = []

    def score(label: str, make) -> None:
        try:
            path = make()
            rows.append({"variant": label, "status": "ok", "accuracy": onnx_accuracy(path, data.x_test, data.y_test)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"variant": label, "status": "failed", "error": common.first_line(exc)})
        print(f"  {label}: {rows[-1].get('accuracy', rows[-1].get('error'))}", flush=True)

    plain = workdir / "digits_plain.onnx"
    score("fp32 (torch.onnx.export)", lambda: common.export_plain(model, example, plain))
    score(PEER, lambda: common.quantize_ort_static(plain, workdir / "digits_static.onnx", calibration))
    score("ORT quantize_dynamic", lambda: common.quantize_ort_dynamic(plain, workdir / "digits_dynamic.onnx"))
    for name in presets:
        if name == "prune":
            def compiled():
                with common.quiet():
                    result = prune_and_fine_tune(model, data)
                    return result.export_onnx(workdir / "digits_prune.onnx", tolerance=1e-4)
            label = "fxcompress:prune + 3 epochs fine-tuning"
        else:
            def compiled(name=name):
                with common.quiet():
                    result = fxcompress.compile(model, example, name, calibration=calibration)
                    return result.export_onnx(workdir / f"digits_{name}.onnx")
            label = f"fxcompress:{name}"
        score(label, compiled)
    reference = rows[0].get("accuracy")
    for row in rows:
        if row["status"] == "ok" and reference is not None:
            row["drop_points"] = 100 * (reference - row["accuracy"])
    return {"model": "DigitsMobileNet", "width": width, "weights": "trained", "epochs": epochs, "train_s": train_s,
            "torch_accuracy": torch_accuracy(model, data.x_test, data.y_test), "test_images": len(data.x_test),
            "rows": rows}


def write(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "depthwise_int8.json").write_text(json.dumps(record, indent=2, default=float))
    meta = record["meta"]
    lines = [
        "# int8 on depthwise networks",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; onnxruntime {meta['onnxruntime']}, torch {meta['torch']}; {meta['date']}  ",
        "",
        "## Random weights (timm, randomized batch norms): fxcompress int8 vs ORT quantize_static",
        "",
        f"Batch 1, ORT CPU provider, interleaved {meta['rounds']} rounds x 8 runs. Same {meta['calibration']} calibration "
        f"inputs for both quantizers; cosine: minimum over {meta['held_out']} held-out random inputs vs the fp32 ONNX "
        "output. Drift: fxcompress's own measure (max |error| / max |output|; int8 tolerance 0.2). "
        "RANDOM WEIGHTS: these show fidelity to the fp32 model, not task accuracy.",
        "",
        "| model | input | BN stats | variant | p50 ms | vs ORT | cosine vs fp32 | drift | float matrix ops | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["random_weights"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['input']} | {r['bn']} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        drift = f"{r['torch_drift']:.3f}" if r.get("torch_drift") is not None else "-"
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        lines.append(f"| {r['model']} | {r['input']} | {r['bn']} | {r['variant']} | {r['p50_ms']:.2f} | {r['vs_peer']:.2f}x | "
                     f"{r['cosine_vs_fp32']:.5f} | {drift} | {r['float_matrix_ops']} | {compile_s} |")
    digits = record.get("trained")
    if digits:
        lines += [
            "",
            "## Trained: DigitsMobileNet (depthwise-separable) on scikit-learn digits, accuracy through ORT",
            "",
            f"width {digits['width']}, {digits['epochs']} epochs ({digits['train_s']:.1f} s); {digits['test_images']} held-out test images; "
            "calibration: 16 training images. Drop in points against the fp32 export."
            + (f" Command: `{digits['command']}` ({digits['date']})." if digits.get("command") else ""),
            "",
            "| variant | accuracy | drop (points) |",
            "|---|---|---|",
        ]
        for r in digits["rows"]:
            if r["status"] == "ok":
                lines.append(f"| {r['variant']} | {100 * r['accuracy']:.2f}% | {r.get('drop_points', 0):+.2f} |")
            else:
                lines.append(f"| {r['variant']} | failed: {r['error']} | |")
    (out / "depthwise_int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI dry run: MobileNetV3 at 64x64, 2 rounds, 2 epochs")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--uneven", action="store_true", help="also the uneven_bn stress variant of each model")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--keep-digits", action="store_true",
                        help="skip the trained part and keep the existing results' trained section (it has no timing)")
    parser.add_argument("--digits-only", action="store_true",
                        help="rerun only the trained part (no timing) and keep the models' rows of the existing results")
    parser.add_argument("--width", type=int, default=None,
                        help="DigitsMobileNet width (default 32: half its channels pruned still leaves room; --quick: 16)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    models = args.models or (["mobilenetv3_large_100"] if args.quick else ["efficientnet_b0", "mobilenetv3_large_100"])
    size = args.size or (64 if args.quick else 224)
    rounds = args.rounds or (2 if args.quick else 10)
    epochs = args.epochs or (2 if args.quick else 8)
    calibration, held_out = (4, 2) if args.quick else (16, 8)
    from fxcompress.passes.presets import PRESETS

    presets = [p for p in ("default", "int8", "int8-dynamic", "fp16", "prune") if p in PRESETS]
    if args.digits_only:  # accuracy only, nothing timed: no need to wait for the timing lock
        existing = json.loads((Path(args.out) / "depthwise_int8.json").read_text())
        with tempfile.TemporaryDirectory(prefix="fxc-depthwise-") as folder:
            existing["trained"] = digits_accuracy(epochs, args.width or 32, presets, Path(folder))
        existing["trained"]["command"] = common.command_line()
        existing["trained"]["date"] = time.strftime("%Y-%m-%d %H:%M")
        write(Path(args.out), existing)
        return 0
    rows: list[dict] = []
    trained = None
    with tempfile.TemporaryDirectory(prefix="fxc-depthwise-") as folder:
        work = Path(folder)
        for name in models:
            for bn in (["randomized", "uneven"] if args.uneven else ["randomized"]):
                print(f"== {name} @ {size}, {bn} batch norms (random weights)", flush=True)
                rows += run_model(name, size, bn, rounds, calibration, held_out, work)
        if args.keep_digits:
            trained = json.loads((Path(args.out) / "depthwise_int8.json").read_text()).get("trained")
        elif not args.no_digits:
            print("== DigitsMobileNet (trained)", flush=True)
            trained = digits_accuracy(epochs, args.width or (16 if args.quick else 32), presets, work)
    meta = {"command": common.command_line(), "machine": quantization.machine(), "rounds": rounds,
            "calibration": calibration, "held_out": held_out,
            "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    write(Path(args.out), {"meta": meta, "random_weights": rows, "trained": trained})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
