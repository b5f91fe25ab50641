"""Model inspection: histogram, parameters, MACs, quantized and sparse shares, providers."""

from __future__ import annotations

import json

import onnx
import pytest

from fxcompress.capture import capture
from fxcompress.errors import ModelFileError
from fxcompress.inspect.model_info import inspect_graph_module, inspect_onnx
from tests.inspect.helpers import residual, small_onnx

CONV_MACS = 4 * 8 * 8 * 3 * 3 * 3
GEMM_MACS = 5 * 256


def test_onnx_figures_match_hand_counts(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_onnx(), str(path))
    info = inspect_onnx(path)
    assert info.histogram == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}
    assert info.parameters == 4 * 27 + 4 + 5 * 256 + 5
    assert info.macs == CONV_MACS + GEMM_MACS
    assert info.file_bytes == path.stat().st_size
    assert info.opsets == {"ai.onnx": 17}
    assert info.quantized_mac_share == 0.0 and info.sparse_share == 0.0
    assert info.providers["CPUExecutionProvider"] == "runs it"
    assert info.inputs == ["x: float32[1, 3, 8, 8]"]


def test_sparse_and_quantized_shares():
    sparse = inspect_onnx(small_onnx(zero_weights=True), check_providers=False)
    # 54 of the 108 conv weights are zero; the 1280 fc weights are not.
    assert sparse.sparse_share == pytest.approx(54 / (108 + 1280))
    quantized = inspect_onnx(small_onnx(quantized=True), check_providers=False)
    assert quantized.quantized_mac_share == pytest.approx(CONV_MACS / (CONV_MACS + GEMM_MACS))
    assert quantized.histogram["QuantizeLinear"] == 2


def test_graph_module_figures():
    model, inputs = residual()
    info = inspect_graph_module(capture(model, inputs), "residual")
    assert info.histogram["aten.batch_norm"] == 3
    # stem: 8 channels x 8x8 outputs x (3 x 3x3); conv1, conv2: 512 outputs x (8 x 3x3); fc: 5 x 8
    assert info.macs == 8 * 8 * 8 * 27 + 2 * 8 * 8 * 8 * 72 + 5 * 8
    assert info.parameters == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point())


def test_model_info_reads_like_every_report(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_onnx(), str(path))
    info = inspect_onnx(path, check_providers=False)
    text = info.to_text()
    assert str(info) == text and "\033[" not in text
    assert f"parameters       {info.parameters:,}" in text and "Conv" in text and "opsets           ai.onnx 17" in text
    assert "\033[1m" in info.to_text(color=True)
    assert json.loads(json.dumps(info.to_dict()))["histogram"] == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}


def test_unreadable_file(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_text("not onnx at all")
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        inspect_onnx(path)
