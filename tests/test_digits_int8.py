"""End to end on the three trained digits models (CNN, transformer encoder over padded sequences,
depthwise-separable MobileNet): int8 and int8-dynamic through the exported ONNX in ORT stay within
half a point of the fp32 export's accuracy (issue 16's target)."""

from __future__ import annotations

import onnx
import pytest

import fxcompress
from tests.digits_trained import MODELS, fp32_accuracy, trained

#: ONNX ops each preset's export must contain (proof the file really computes in int8).
INT8_OPS = {"int8": {"QuantizeLinear", "DequantizeLinear"}, "int8-dynamic": {"DynamicQuantizeLinear", "MatMulInteger"}}


@pytest.mark.parametrize("preset", ["int8", "int8-dynamic"])
@pytest.mark.parametrize("name", MODELS)
def test_int8_presets_keep_accuracy_through_onnx_runtime_within_half_a_point(name, preset, tmp_path):
    model = trained(name)
    reference = fp32_accuracy(name)
    assert reference > 0.9, "the test model did not train"
    result = fxcompress.compile(model.model, model.example, preset, calibration=model.calibration)
    path = result.export_onnx(tmp_path / f"{preset}.onnx")
    assert INT8_OPS[preset] <= {n.op_type for n in onnx.load(str(path)).graph.node}
    accuracy = model.onnx_accuracy(path)
    print(f"{name} {preset}: accuracy through ORT fp32 {reference:.4f} -> {accuracy:.4f}")
    assert reference - accuracy <= 0.005, (name, preset, reference, accuracy)
