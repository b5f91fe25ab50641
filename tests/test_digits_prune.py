"""End to end: the digits CNN trained here, `prune` 0.5 (L2 importance) plus 3 epochs of fine-tuning of
result.module, accuracy through the exported ONNX in ORT; then the pruned model through `int8`."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.examples.digits import DigitsCNN, load_digits_data, onnx_accuracy, prune_and_fine_tune, train

# Trains, compiles three times and exports three models: about a minute on a quiet 2-core machine,
# worth it in CI because it is issue 5's accuracy target.


def run_pipeline(tmp_path, seed: int = 0) -> dict:
    """fp32 -> prune 0.5 (L2) + 3 epochs of fine-tuning -> int8; accuracies on the held-out split in ORT."""
    torch.manual_seed(seed)
    data = load_digits_data()
    model = train(DigitsCNN(), data, epochs=8)
    example = (data.x_train[:1],)
    plain = fxcompress.compile(model, example, []).export_onnx(tmp_path / "fp32.onnx")

    pruned = prune_and_fine_tune(model, data)  # L2 importance, then 3 epochs (batch 8, cosine)
    stats = next(r.stats for r in pruned.report.records if r.name == "prune-channels")
    pruned.module.eval()
    pruned_path = pruned.export_onnx(tmp_path / "pruned.onnx", tolerance=1e-4)

    calibration = [(data.x_train[i:i + 32],) for i in range(0, 256, 32)]
    quantized = fxcompress.compile(pruned.module, example, "int8", calibration=calibration)
    int8_path = quantized.export_onnx(tmp_path / "pruned_int8.onnx")
    return {
        "fp32": onnx_accuracy(plain, data.x_test, data.y_test),
        "pruned": onnx_accuracy(pruned_path, data.x_test, data.y_test),
        "int8": onnx_accuracy(int8_path, data.x_test, data.y_test),
        "macs": (stats["macs_before"], stats["macs_after"]),
        "bytes": {p.name: p.stat().st_size for p in (plain, pruned_path, int8_path)},
    }


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory):
    pytest.importorskip("sklearn")
    out = run_pipeline(tmp_path_factory.mktemp("digits-prune"))
    print(out)
    return out


def test_pruned_model_is_smaller_and_recovers_with_fine_tuning(accuracies):
    assert accuracies["fp32"] > 0.9, "the test model did not train"
    before, after = accuracies["macs"]
    assert after < 0.4 * before
    assert accuracies["bytes"]["pruned.onnx"] < accuracies["bytes"]["fp32.onnx"] / 2
    # Measured (seed 0, ORT, 2 torch threads): 99.11 -> 98.67 (pruned + 3 epochs) -> 98.67 (+ int8).
    assert accuracies["fp32"] - accuracies["pruned"] <= 0.04
    assert accuracies["pruned"] - accuracies["int8"] <= 0.01


def test_issue_target_drop_within_one_point(accuracies):
    # Issue 5 target. Not a wide margin: 1 point is 4.5 of the 450 test images, and the fp32
    # model alone varies by 2 points over seeds. prune_and_fine_tune (L2, 3 epochs at batch 8,
    # cosine) measured over torch.manual_seed 0..5 (PyTorch accuracy, 2 threads): drops of
    # 0.44/0.44/-0.44/1.33/0.44/-0.89 points, so seed 3 (whose fp32 model is the luckiest at
    # 99.78%) misses by two images. Batch 16 gave 1.11/1.33/-0.22/1.33/0.89/-1.11; distillation
    # from the fp32 model (T=4) 1.56/1.11/0.89/0.89/1.33/0.44. Results also move with the torch
    # thread count (float reduction order changes the training run).
    assert accuracies["fp32"] - accuracies["pruned"] <= 0.01
    assert accuracies["fp32"] - accuracies["int8"] <= 0.015
