"""int8 on depthwise networks: timm MobileNetV3 / EfficientNet-B0 (random weights, randomized batch
norms) compile under the int8 preset's default tolerance, and a trained depthwise-separable
digits MobileNet keeps its accuracy through ONNX Runtime."""

from __future__ import annotations

import onnx
import pytest
import torch

import fxcompress
from fxcompress.examples.digits import DigitsMobileNet, load_digits_data, onnx_accuracy, train
from fxcompress.passes.presets import INT8_TOLERANCE
from tests.models import randomize_bn


def _compile_timm(name: str, size: int):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False)).eval()
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(1, 3, size, size, generator=g),)
    calibration = [(torch.randn(1, 3, size, size, generator=g),) for _ in range(8)]
    # No tolerance argument: the preset's own bound applies, and a drift beyond it raises DriftError.
    result = fxcompress.compile(model, example, "int8", calibration=calibration)
    held_out = torch.randn(1, 3, size, size, generator=g)
    with torch.no_grad():
        cosine = float(torch.nn.functional.cosine_similarity(model(held_out).flatten(), result.module(held_out).flatten(), dim=0))
    stats = {r.name: r.stats for r in result.report.records}
    print(f"{name} @ {size}: drift {result.report.drift:.4f}, held-out cosine {cosine:.5f}, "
          f"equalize {stats.get('equalize-layers')}, correct-bias corrected {stats.get('correct-bias', {}).get('corrected')}")
    assert result.report.drift <= INT8_TOLERANCE and result.report.gate.passes(result.report.outputs)
    assert cosine > 0.99
    assert stats["correct-bias"]["corrected"] > 20
    return stats


def test_mobilenetv3_compiles_under_the_int8_default_tolerance():
    stats = _compile_timm("mobilenetv3_large_100", 64)
    # ReLU pairs (expand -> depthwise) and squeeze-excitation gates are equalized; hardswish pairs are not.
    assert stats["equalize-layers"]["pairs"] > 5 and stats["equalize-layers"]["gates_scaled"] > 0


@pytest.mark.slow
def test_efficientnet_b0_compiles_under_the_int8_default_tolerance():
    stats = _compile_timm("efficientnet_b0", 96)
    assert stats["equalize-layers"]["gates_scaled"] > 0  # SiLU everywhere: only the SE gates carry scales


@pytest.fixture(scope="module")
def trained_mobilenet():
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    data = load_digits_data()
    return train(DigitsMobileNet(), data, epochs=8), data


def test_digits_mobilenet_int8_accuracy_through_onnx_runtime_within_half_a_point(trained_mobilenet, tmp_path):
    model, data = trained_mobilenet
    example = (data.x_train[:1],)
    calibration = [(data.x_train[i:i + 32],) for i in range(0, 256, 32)]
    plain = fxcompress.compile(model, example, []).export_onnx(tmp_path / "fp32.onnx")
    result = fxcompress.compile(model, example, "int8", calibration=calibration)
    path = result.export_onnx(tmp_path / "int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    fp32_acc = onnx_accuracy(plain, data.x_test, data.y_test)
    int8_acc = onnx_accuracy(path, data.x_test, data.y_test)
    print(f"digits MobileNet accuracy through ORT: fp32 {fp32_acc:.4f}, int8 {int8_acc:.4f}")
    assert fp32_acc > 0.9, "the test model did not train"
    assert fp32_acc - int8_acc <= 0.005, (fp32_acc, int8_acc)
