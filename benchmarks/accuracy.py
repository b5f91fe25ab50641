"""Accuracy on real data: the digits CNN, trained here, then every preset and the ORT quantizers,
each scored through ONNX Runtime on the held-out digits.

    python benchmarks/accuracy.py [--out benchmarks/results] [--epochs 8]

Writes ``<out>/accuracy.json`` and re-renders the summary files (the README section includes the
accuracy table). Random-weight models (benchmarks/run.py) can only show fidelity to the fp32
model; this shows what a preset costs in task accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--presets", default=None, help="comma-separated (default: every registered preset)")
    args = parser.parse_args(argv)

    import torch

    import fxcompress
    from fxcompress.examples.digits import (DigitsCNN, load_digits_data, onnx_accuracy, prune_and_fine_tune,
                                            torch_accuracy, train)
    from fxcompress.passes.presets import PRESETS

    presets = list(PRESETS) if args.presets is None else [p.strip() for p in args.presets.split(",") if p.strip()]
    missing = [p for p in presets if p not in PRESETS]
    if missing:
        print(f"error: unknown preset(s) {missing}; registered: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    data = load_digits_data()
    start = time.perf_counter()
    torch.manual_seed(0)  # deterministic initial weights, whatever the imports drew from the RNG
    model = train(DigitsCNN(), data, epochs=args.epochs)
    print(f"trained DigitsCNN in {time.perf_counter() - start:.1f} s; PyTorch test accuracy "
          f"{torch_accuracy(model, data.x_test, data.y_test):.2%}", flush=True)
    example = (data.x_train[:1],)
    # Calibration from training images only: the test split stays unseen.
    calibration = [(data.x_train[i:i + 1],) for i in range(0, 16 * 16, 16)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxc-accuracy-") as folder:
        work = Path(folder)

        def score(label: str, make) -> None:
            try:
                path = make()
                rows.append({"variant": label, "status": "ok", "accuracy": onnx_accuracy(path, data.x_test, data.y_test),
                             "size_kb": path.stat().st_size / 1024})
            except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not a crash
                rows.append({"variant": label, "status": "failed", "error": common.first_line(exc)})
            print(f"  {label}: {rows[-1].get('accuracy', rows[-1].get('error'))}", flush=True)

        plain = work / "plain.onnx"
        score("torch.onnx.export (fp32)", lambda: common.export_plain(model, example, plain))
        score("ORT static int8", lambda: common.quantize_ort_static(plain, work / "static.onnx", calibration))
        score("ORT dynamic int8", lambda: common.quantize_ort_dynamic(plain, work / "dynamic.onnx"))
        for name in presets:
            def compiled(name=name):
                with common.quiet():
                    result = fxcompress.compile(model, example, name, calibration=calibration)
                    return result.export_onnx(work / f"{name.replace(':', '-')}.onnx")

            score(f"fxcompress:{name}", compiled)
        if "prune" in presets:  # how `prune` is meant to be used: the user fine-tunes result.module
            tuned = {}

            def pruned_and_tuned():
                with common.quiet():
                    tuned["result"] = prune_and_fine_tune(model, data)
                    return tuned["result"].export_onnx(work / "prune-tuned.onnx", tolerance=1e-4)

            def pruned_tuned_int8():
                with common.quiet():
                    result = fxcompress.compile(tuned["result"].module, example, "int8", calibration=calibration)
                    return result.export_onnx(work / "prune-tuned-int8.onnx")

            score("fxcompress:prune + 8 epochs fine-tuning", pruned_and_tuned)
            score("fxcompress:prune + fine-tuning, then int8", pruned_tuned_int8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = rows[0]["accuracy"] if rows[0]["status"] == "ok" else None
    record = {
        "model": "digits_cnn", "test_images": len(data.x_test), "epochs": args.epochs, "provider": "cpu",
        "reference_accuracy": reference, "command": common.command_line(),
        "machine": common.machine_description(provider_used="cpu"), "rows": rows,
    }
    report.write_json(out / "accuracy.json", record)
    (out / "models").mkdir(exist_ok=True)
    report.render(out)
    print(report.accuracy_table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
