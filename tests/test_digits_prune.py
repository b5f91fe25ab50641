"""End to end on the three trained digits models: the `prune` preset (each model's ratio, L2
importance) plus the model's fine-tuning run on result.module, accuracy through the exported ONNX
in ORT within one point of the fp32 export (issue 16's target); then the pruned CNN through `int8`."""

from __future__ import annotations

import onnx
import pytest

import fxcompress
from tests.digits_trained import MODELS, fp32_accuracy, pruned, trained


@pytest.mark.parametrize("name", MODELS)
def test_prune_and_fine_tuning_stays_within_one_point_and_shrinks_the_model(name):
    model = trained(name)
    reference = fp32_accuracy(name)
    assert reference > 0.9, "the test model did not train"
    result, path = pruned(name)
    stats = next(r.stats for r in result.report.records if r.name == "prune-channels")
    accuracy = model.onnx_accuracy(path)
    print(f"{name} prune {model.prune_options} + fine-tuning ({model.fine_tune_label}): accuracy through ORT "
          f"{reference:.4f} -> {accuracy:.4f}, MACs {stats['macs_after'] / stats['macs_before']:.2f}x")
    assert stats["pruned"] > 0 and stats["macs_after"] < 0.8 * stats["macs_before"]
    assert stats["params_after"] < 0.8 * stats["params_before"]
    # Issue 16's target. Not a wide margin: 1 point is 4.5 of the 450 test images, and the fp32
    # models alone vary by 1-2 points over seeds (and over torch thread counts, which change the
    # float reduction order of training). The seeds and budgets here are fixed.
    assert reference - accuracy <= 0.01, (name, reference, accuracy)


def test_pruned_and_fine_tuned_cnn_then_int8_keeps_its_accuracy(tmp_path):
    model = trained("digits-cnn")
    result, path = pruned("digits-cnn")
    quantized = fxcompress.compile(result.module, model.example, "int8", calibration=model.calibration)
    int8_path = quantized.export_onnx(tmp_path / "pruned_int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    assert model.onnx_accuracy(path) - model.onnx_accuracy(int8_path) <= 0.01
    assert fp32_accuracy("digits-cnn") - model.onnx_accuracy(int8_path) <= 0.015
