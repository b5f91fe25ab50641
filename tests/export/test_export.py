"""ONNX export: checked output, metadata, dynamic batch, atomic writes, and file loading errors."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
import pytest
import torch

import fxcompress
from fxcompress.errors import ExportError, ModelFileError
from fxcompress.export.atomic import write_atomically
from fxcompress.export.onnx_export import load_onnx
from tests.models import ConvBnRelu, TupleOutput, randomize_bn


@pytest.fixture(scope="module")
def compiled():
    model = randomize_bn(ConvBnRelu()).eval()
    x = torch.randn(1, 3, 16, 16)
    return model, x, fxcompress.compile(model, (x,))


def test_export_writes_checked_model_with_metadata(compiled, tmp_path):
    _, _, result = compiled
    path = result.export_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fxcompress_version"] == fxcompress.__version__
    assert meta["fxcompress_recipe"] == "default"
    assert float(meta["fxcompress_parity_drift"]) <= 1e-4
    assert result.report.parity.passed


def test_failed_export_leaves_existing_file_untouched(compiled, tmp_path, monkeypatch):
    _, _, result = compiled
    target = tmp_path / "good.onnx"
    target.write_bytes(b"previous good file")

    def broken_save(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(ExportError, match="disk full"):
        result.export_onnx(target)
    assert target.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]  # no temp file left


def test_parity_failure_writes_nothing(compiled, tmp_path, monkeypatch):
    _, _, result = compiled
    import fxcompress.api as api

    original = api.validate_onnx

    def strict(model, module, inputs, tolerance, **options):
        return dataclasses.replace(original(model, module, inputs, tolerance=tolerance, **options), passed=False)  # a mismatch

    monkeypatch.setattr(api, "validate_onnx", strict)
    with pytest.raises(ExportError, match="does not match the compiled module"):
        result.export_onnx(tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()
    assert list(tmp_path.iterdir()) == []


def test_output_folder_must_exist_and_not_be_a_directory(compiled, tmp_path):
    _, _, result = compiled
    with pytest.raises(ExportError, match="does not exist"):
        result.export_onnx(tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        result.export_onnx(tmp_path)


def test_write_atomically_replaces_only_on_success(tmp_path):
    target = tmp_path / "f.bin"
    write_atomically(target, lambda p: p.write_bytes(b"one"))
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        write_atomically(target, lambda p: (p.write_bytes(b"half"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert target.read_bytes() == b"one"


def test_dynamic_batch_export(tmp_path):
    model = randomize_bn(ConvBnRelu()).eval()
    result = fxcompress.compile(model, (torch.randn(2, 3, 16, 16),),
                                options=fxcompress.CompileOptions(dynamic_batch=True))
    path = result.export_onnx(tmp_path / "dyn.onnx")
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param  # symbolic
    report = fxcompress.validate(path, model, (torch.randn(5, 3, 16, 16),))
    assert report.passed


def test_tuple_outputs_export_and_match(tmp_path):
    model = TupleOutput().eval()
    x = torch.randn(3, 6)
    path = fxcompress.compile(model, (x,)).export_onnx(tmp_path / "t.onnx")
    assert len(onnx.load(str(path)).graph.output) == 2
    assert fxcompress.validate(path, model, (x,)).passed


def test_simplify_is_kept_only_when_it_checks(compiled, tmp_path):
    _, _, result = compiled
    path = result.export_onnx(tmp_path / "s.onnx", simplify=True)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["simplified"] in ("True", "False")
    assert result.report.parity.passed


@pytest.mark.parametrize(
    "content, fragment",
    [(None, "does not exist"), (b"", "is empty"), (b"\x08\x07garbage\xff\xfe" * 10, "not a readable ONNX model")],
)
def test_load_onnx_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=fragment):
        load_onnx(path)


def test_truncated_onnx_file(compiled, tmp_path):
    _, _, result = compiled
    path = result.export_onnx(tmp_path / "full.onnx")
    data = path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError):
        load_onnx(cut)


def test_external_data_outside_model_folder_is_refused(compiled, tmp_path):
    _, _, result = compiled
    path = result.export_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(model.SerializeToString())
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        load_onnx(evil)
    entry.value = os.path.abspath("/etc/passwd")
    evil.write_bytes(model.SerializeToString())
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        load_onnx(evil)
