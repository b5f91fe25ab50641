"""Quantized weights are stored as int8 in the exported file, with bit-identical outputs."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

import fxcompress
from fxcompress.export.int8_weights import store_int8_weights
from tests.models import ConvBnRelu

X = torch.randn(2, 3, 16, 16)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _qdq_weight_model(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> onnx.ModelProto:
    """y = x @ dequantize(quantize(W))^T: one constant weight through Q/DQ, then a Gemm."""
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=axis),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=axis),
        helper.make_node("Gemm", ["x", "wd"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, weight.shape[1]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, weight.shape[0]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_per_channel_and_per_tensor_weights_become_int8_with_identical_outputs():
    rng = np.random.default_rng(0)
    # Values on the rounding midpoints (k + 0.5) * scale check round-half-to-even; large ones saturate.
    weight = np.concatenate([rng.normal(size=(4, 6)), (np.arange(-3, 3) + 0.5)[None] * 0.1, [[900.0] * 6]]).astype(np.float32)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    for scale, zero_point in [
        (np.linspace(0.05, 0.2, weight.shape[0]).astype(np.float32), np.zeros(weight.shape[0], np.int8)),  # per channel
        (np.array(0.1, np.float32), np.array(3, np.uint8)),  # per tensor, asymmetric uint8
    ]:
        original = _qdq_weight_model(weight, scale, zero_point, axis=0)
        stored, count = store_int8_weights(copy.deepcopy(original))
        onnx.checker.check_model(stored, full_check=True)
        assert count == 1
        assert [n.op_type for n in stored.graph.node] == ["DequantizeLinear", "Gemm"]
        assert "w" not in {t.name for t in stored.graph.initializer}, "the float weight is still stored"
        kinds = {t.name: t.data_type for t in stored.graph.initializer}
        assert kinds["wq"] == (onnx.TensorProto.INT8 if zero_point.dtype == np.int8 else onnx.TensorProto.UINT8)
        np.testing.assert_array_equal(_run(original, x)[0], _run(stored, x)[0])


def test_quantize_of_an_activation_is_left_alone():
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    _, count = store_int8_weights(model)
    assert count == 0 and [n.op_type for n in model.graph.node] == ["QuantizeLinear", "DequantizeLinear"]


def test_int8_export_stores_weights_as_int8(tmp_path):
    model = ConvBnRelu(channels=32).eval()
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    fp32 = fxcompress.compile(model, (X,), "default").export_onnx(tmp_path / "fp32.onnx")
    int8 = fxcompress.compile(model, (X,), "int8", calibration=calibration).export_onnx(tmp_path / "int8.onnx")
    stored = onnx.load(int8)
    weights = [t for t in stored.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for t in weights)
    quantize_inputs = {n.input[0] for n in stored.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantize_inputs & {t.name for t in stored.graph.initializer}, "a constant is still quantized at run time"
    float_weight_bytes = sum(np.prod(t.dims) * 4 for t in onnx.load(fp32).graph.initializer if len(t.dims) >= 2)
    int8_weight_bytes = sum(np.prod(t.dims) for t in weights)
    assert int8_weight_bytes * 4 == float_weight_bytes
