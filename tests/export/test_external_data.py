"""Weights on disk during export (fxcompress.export.external): one file under the protobuf limit,
the model plus a .onnx.data file over it, the same model either way, nothing left behind."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ExportError
from fxcompress.export import external
from fxcompress.export.onnx_export import load_onnx


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("preset", ["default", "int4-weights"])
def test_file_matches_in_memory_export(tmp_path, preset):
    model, x = _model(), torch.randn(2, 32)
    result = fxcompress.compile(model, (x,), preset, tolerance=1.0)
    path = result.export_onnx(tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one file, no work folder left
    written, in_memory = onnx.load(str(path)), result.export_proto()
    assert not any(external.is_external(t) for t in written.graph.initializer)
    assert written.graph.node == in_memory.graph.node
    expected = _weights(in_memory)
    assert _weights(written).keys() == expected.keys()
    for name, values in _weights(written).items():
        np.testing.assert_array_equal(values, expected[name])
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, x), model(x).numpy(), atol=1e-5 if preset == "default" else 0.5)


def test_over_the_limit_writes_data_file_beside(tmp_path, monkeypatch):
    model, x = _model(), torch.randn(2, 32)
    result = fxcompress.compile(model, (x,))
    single = result.export_onnx(tmp_path / "one.onnx")
    monkeypatch.setattr(external, "PROTOBUF_LIMIT", 1024)  # every model is "large"
    path = result.export_onnx(tmp_path / "two.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx", "two.onnx", "two.onnx.data"]
    loaded = onnx.load(str(path))  # onnx reads the data file beside it
    assert any(external.is_external(t) for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    for name, values in _weights(loaded).items():
        np.testing.assert_array_equal(values, _weights(onnx.load(str(single)))[name])
    # compacted: exactly the bytes of the tensors the graph reads
    assert (tmp_path / "two.onnx.data").stat().st_size == sum(v.nbytes for v in _weights(loaded).values() if v.nbytes >= external.EXTERNAL_BYTES)
    np.testing.assert_array_equal(_run(path, x), _run(single, x))
    assert _weights(load_onnx(path)).keys() == _weights(loaded).keys()  # fxcompress's own reader opens it too


def test_write_inline_is_the_serialized_model(tmp_path):
    proto = fxcompress.compile(_model(), (torch.randn(2, 32),)).export_proto(validate=False)
    data = tmp_path / "m.onnx.data"
    held = onnx.ModelProto()
    held.CopyFrom(proto)
    external.externalize(held, data)
    assert sum(external.is_external(t) for t in held.graph.initializer) == 2  # the two weight matrices
    out = io.BytesIO()
    external.write_inline(held, tmp_path, out)
    written = onnx.ModelProto.FromString(out.getvalue())
    # the same message, the external initializers after the inline ones
    assert {t.name: t for t in written.graph.initializer} == {t.name: t for t in proto.graph.initializer}
    del written.graph.initializer[:], proto.graph.initializer[:]
    assert written == proto


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    result = fxcompress.compile(_model(), (torch.randn(2, 32),))

    def broken(*args, **kwargs):
        raise ExportError("parity broke", "nothing")
    monkeypatch.setattr(fxcompress.api, "validate_onnx", broken)
    with pytest.raises(ExportError):
        result.export_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
