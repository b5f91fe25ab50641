"""Hostile and broken files: pickles, crafted .pt2 archives, ONNX external-data path traversal,
truncated, empty and oversized files. Each is refused with a clear message; nothing runs, nothing
outside the model's folder is read, nothing is written.

The "payload" used below is a pickle whose loading creates a marker file (``open(marker, "w")``):
if the marker exists afterwards, code from the file ran.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import fxcompress
from fxcompress.cli import main
from fxcompress.errors import ModelFileError, UntrustedFileError
from fxcompress.export.onnx_export import load_onnx
from fxcompress.loading import load_calibration, load_model
from fxcompress.runtime.session import create_session
from tests.models import ConvBnRelu


class _Payload:
    """Unpickling this creates ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "CODE_RAN"


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    model = ConvBnRelu().eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), str(path))
    return path


def _rewrite_archive(source: Path, target: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> Path:
    """Copy a zip archive, replacing members whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        root = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            data = src.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            out.writestr(info, data)
        for name, data in (add or {}).items():
            out.writestr(f"{root}/{name}", data)
    return target


# --- pickles -----------------------------------------------------------------------------------


def test_pickled_module_refused_without_trust_and_code_does_not_run(tmp_path, marker):
    path = tmp_path / "model.pt"
    path.write_bytes(_pickled(_Payload(marker)))
    with pytest.raises(UntrustedFileError, match="pickled file; loading a pickled module runs whatever code"):
        load_model(str(path), [(1, 4)])
    assert not marker.exists()


def test_cli_refuses_pickle_without_flag_and_writes_nothing(tmp_path, marker, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes(_pickled(_Payload(marker)))
    out = tmp_path / "out.onnx"
    assert main(["compile", str(path), "--out", str(out), "--input-shape", "1,4", "--no-baseline"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_trusted_pickle_loads(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(ConvBnRelu().eval(), path)
    loaded = load_model(str(path), [(1, 3, 8, 8)], trust_pickle=True)
    assert isinstance(loaded.model, ConvBnRelu)


def test_trusted_pickle_holding_a_state_dict_is_explained(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(ConvBnRelu().state_dict(), path)
    with pytest.raises(ModelFileError, match="not an nn.Module"):
        load_model(str(path), [(1, 3, 8, 8)], trust_pickle=True)


def test_calibration_file_is_loaded_weights_only(tmp_path, marker):
    path = tmp_path / "calib.pt"
    path.write_bytes(_pickled([_Payload(marker)]))
    with pytest.raises(ModelFileError, match="could not be loaded safely"):
        load_calibration(str(path), (torch.randn(1, 4),))
    assert not marker.exists()


# --- torch.export archives ----------------------------------------------------------------------


def test_good_archive_loads_without_trust(good_archive):
    loaded = load_model(str(good_archive))
    assert [tuple(t.shape) for t in loaded.example_inputs] == [(1, 3, 8, 8)]
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the override is scoped to the load


def test_archive_with_payload_in_sample_inputs_is_refused(good_archive, tmp_path, marker):
    # torch.export.load unpickles sample inputs with a fallback to weights_only=False: before the
    # fix, this archive ran the payload on load.
    evil = _rewrite_archive(good_archive, tmp_path / "evil.pt2", {"sample_inputs/model.pt": _pickled({"x": _Payload(marker)})})
    with pytest.raises(UntrustedFileError, match=r"references (io|builtins)\.open"):
        load_model(str(evil))
    assert not marker.exists()


def test_archive_with_payload_refused_through_cli(good_archive, tmp_path, marker, capsys):
    evil = _rewrite_archive(good_archive, tmp_path / "evil.pt2", {"sample_inputs/model.pt": _pickled((_Payload(marker),))})
    out = tmp_path / "out.onnx"
    assert main(["compile", str(evil), "--out", str(out), "--no-baseline"]) == 2
    assert "pickled Python objects" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_archive_with_raw_pickled_custom_object_is_refused(good_archive, tmp_path, marker):
    import pickle

    evil = _rewrite_archive(good_archive, tmp_path / "evil.pt2", {},
                            add={"data/constants/opaque_obj_0": pickle.dumps(_Payload(marker))})
    with pytest.raises(UntrustedFileError, match="opaque_obj_0"):
        load_model(str(evil))
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_archive_is_a_clear_error(good_archive, tmp_path, keep):
    data = good_archive.read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="not a loadable torch.export archive"):
        load_model(str(cut))


def test_empty_and_oversized_model_files(tmp_path, good_archive, monkeypatch):
    empty = tmp_path / "empty.pt2"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="is empty"):
        load_model(str(empty))
    monkeypatch.setattr("fxcompress.files.MAX_MODEL_FILE_BYTES", 100)
    with pytest.raises(ModelFileError, match="over the"):
        load_model(str(good_archive))


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(str(tmp_path / "nope.pt2"))


# --- ONNX files with external data ----------------------------------------------------------------

SECRET = b"TOPSECRET-TOPSECRET-TOPSECRET-TO"  # 32 bytes = 8 floats


def _external(name: str, location: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[8], data_location=TensorProto.EXTERNAL)
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _add_model(nodes, initializers=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # what ORT 1.2x reads
    return model


def _initializer_model(location: str) -> onnx.ModelProto:
    return _add_model([helper.make_node("Add", ["x", "w"], ["y"])], [_external("w", location)])


def _constant_model(location: str) -> onnx.ModelProto:
    # Not an initializer: a Constant node's tensor attribute can point at external data too.
    const = helper.make_node("Constant", [], ["w"], value=_external("w_value", location))
    return _add_model([const, helper.make_node("Add", ["x", "w"], ["y"])])


def _subgraph_model(location: str) -> onnx.ModelProto:
    # An If node whose branch holds the external initializer (subgraphs are graphs too).
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["b"])], "branch", [], [out],
                               initializer=[_external("w", location)])
    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", TensorProto.BOOL, [], [True]))
    if_node = helper.make_node("If", ["c"], ["w2"], then_branch=branch, else_branch=branch)
    return _add_model([cond, if_node, helper.make_node("Add", ["x", "w2"], ["y"])])


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """tmp/secret.bin (outside) and tmp/model/ (the model folder)."""
    (tmp_path / "secret.bin").write_bytes(SECRET)
    (tmp_path / "model").mkdir()
    return tmp_path


def _write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


_BUILDERS = {"initializer": _initializer_model, "constant": _constant_model, "subgraph": _subgraph_model}


def _hostile_locations(layout: Path) -> dict[str, str]:
    link = layout / "model" / "link.bin"
    link.symlink_to(layout / "secret.bin")
    return {"dotdot": "../secret.bin", "absolute": str(layout / "secret.bin"), "symlink": "link.bin"}


def _entry_points(path: Path) -> dict[str, callable]:
    feed = (torch.zeros(8),)
    return {
        "load_onnx": lambda: load_onnx(path),
        "create_session": lambda: create_session(path),
        "validate": lambda: fxcompress.validate(path, torch.nn.Identity(), feed),
        "benchmark": lambda: fxcompress.benchmark(path, feed, warmup=0, runs=1),
    }


@pytest.mark.parametrize("where", list(_BUILDERS))
def test_external_data_outside_the_model_folder_is_refused_everywhere(layout, where, capsys):
    for kind, location in _hostile_locations(layout).items():
        path = _write(_BUILDERS[where](location), layout / "model" / f"{where}-{kind}.onnx")
        for entry, call in _entry_points(path).items():
            with pytest.raises(ModelFileError, match="outside the model's folder") as info:
                call()
            assert SECRET.decode() not in str(info.value), (where, kind, entry)
        assert main(["bench", str(path), "--runs", "1", "--warmup", "0"]) == 2, (where, kind)
        assert "outside the model's folder" in capsys.readouterr().err


def test_external_data_inside_the_folder_still_works(layout):
    data = np.arange(8, dtype=np.float32)
    (layout / "model" / "w.bin").write_bytes(data.tobytes())
    path = _write(_initializer_model("w.bin"), layout / "model" / "ok.onnx")
    session = create_session(path)
    np.testing.assert_array_equal(session.run([np.ones(8, np.float32)])[0], data + 1)


def test_missing_or_short_external_data_is_a_clear_error(layout):
    path = _write(_initializer_model("w.bin"), layout / "model" / "m.onnx")
    with pytest.raises(ModelFileError, match="is missing"):
        load_onnx(path)
    (layout / "model" / "w.bin").write_bytes(b"\0" * 8)  # 2 floats where 8 are declared
    with pytest.raises(fxcompress.FxCompressError):
        create_session(path).run([np.ones(8, np.float32)])


# --- truncated, empty, oversized ONNX ---------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    result = fxcompress.compile(ConvBnRelu().eval(), (torch.randn(1, 3, 8, 8),))
    return result.export_onnx(path, validate=False).read_bytes()


def test_truncated_onnx_is_refused_at_every_cut(onnx_bytes, tmp_path):
    path = tmp_path / "cut.onnx"
    for cut in range(1, len(onnx_bytes), max(1, len(onnx_bytes) // 60)):
        path.write_bytes(onnx_bytes[:cut])
        with pytest.raises(ModelFileError, match="corrupt or truncated"):
            load_onnx(path)


def test_empty_oversized_missing_and_non_onnx_files(onnx_bytes, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="is empty"):
        load_onnx(path)
    path.write_bytes(onnx_bytes)
    with pytest.raises(ModelFileError, match="over the"):
        load_onnx(path, max_bytes=100)
    with pytest.raises(ModelFileError, match="does not exist"):
        create_session(tmp_path / "nope.onnx")
    with pytest.raises(ModelFileError, match="is not a file"):
        load_onnx(tmp_path)
    path.write_bytes(b"this is not protobuf at all \xff\xfe" * 10)
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        fxcompress.benchmark(path, (torch.randn(1, 3, 8, 8),), warmup=0, runs=1)


def test_constant_output_model_without_nodes_loads(tmp_path):
    # An all-zero head (torchvision's ViT initialises its classifier so) folds the whole model to
    # one constant: the ONNX graph has no nodes, only an output, and is a valid model, not a
    # truncated file.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)).eval()
    torch.nn.init.zeros_(model[1].weight)
    torch.nn.init.zeros_(model[1].bias)
    path = fxcompress.compile(model, (torch.randn(1, 3, 2, 2),)).export_onnx(tmp_path / "zeros.onnx")
    loaded = load_onnx(path)
    assert not loaded.graph.node and len(loaded.graph.output) == 1
    outputs = create_session(path).run([np.random.rand(1, 3, 2, 2).astype(np.float32)])
    assert not np.any(outputs[0]) and outputs[0].shape == (1, 4)
