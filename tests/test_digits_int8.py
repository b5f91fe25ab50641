"""End to end: the digits CNN trained here, int8 through the exported ONNX in ORT, within 0.5 points."""

from __future__ import annotations

import onnx
import pytest
import torch

import fxcompress
from fxcompress.examples.digits import DigitsCNN, load_digits_data, onnx_accuracy, train


@pytest.fixture(scope="module")
def trained():
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    data = load_digits_data()
    return train(DigitsCNN(width=16), data, epochs=6), data


def test_int8_accuracy_drop_through_onnx_runtime_is_at_most_half_a_point(trained, tmp_path):
    model, data = trained
    example = (data.x_train[:1],)
    calibration = [(data.x_train[i:i + 32],) for i in range(0, 256, 32)]  # split into batch-1 chunks
    plain = fxcompress.compile(model, example, []).export_onnx(tmp_path / "fp32.onnx")
    result = fxcompress.compile(model, example, "int8", calibration=calibration)
    path = result.export_onnx(tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp32_acc = onnx_accuracy(plain, data.x_test, data.y_test)
    int8_acc = onnx_accuracy(path, data.x_test, data.y_test)
    print(f"digits accuracy through ORT: fp32 {fp32_acc:.4f}, int8 {int8_acc:.4f}")
    assert fp32_acc > 0.9, "the test model did not train"
    assert fp32_acc - int8_acc <= 0.005, (fp32_acc, int8_acc)
