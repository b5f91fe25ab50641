"""The output folder appears complete or not at all, replaces only its own kind, and reads back."""

from __future__ import annotations

import os

import pytest

from fxcompress.errors import ExportError, InputError
from fxcompress.output_folder import MANIFEST_FORMAT, OutputFolder, is_folder_target, read_manifest, render_manifest


def _manifest(recipe: str) -> dict:
    return {"format": MANIFEST_FORMAT, "source": "tests", "task": "image-classification", "recipe": recipe,
            "passes": ["quantize-int8"], "graphs": {"model": {"file": "model.onnx", "bytes": 1000, "inputs": ["x"],
                                                              "outputs": ["output_0"]}},
            "metric": {"name": "top1", "data": "photos", "values": {"original": {"value": 0.9}, "compiled": {"value": 0.875}}},
            "provider": "cpu", "files": ["manifest.json"], "versions": {"fxcompress": "0"}}


def test_a_failure_leaves_nothing_and_a_success_replaces_the_earlier_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputFolder(target) as folder:
            folder.write_json("manifest.json", _manifest("int8"))
            raise RuntimeError("export failed half-way")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy

    with OutputFolder(target) as folder:
        folder.write_json("manifest.json", _manifest("int8"))
    with OutputFolder(target) as folder:
        folder.write_json("manifest.json", _manifest("fp16"))
    assert read_manifest(target)["recipe"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (target / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~mask
    text = render_manifest(read_manifest(target))
    assert "recipe: fp16" in text and "original 90.00%, compiled 87.50%" in text and "inputs x -> outputs output_0" in text


def test_refuses_to_replace_a_folder_of_other_files(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"")
    with pytest.raises(ExportError, match="will not replace"):
        OutputFolder(tmp_path / "photos")
    with pytest.raises(ExportError, match="does not exist"):
        OutputFolder(tmp_path / "missing" / "out")
    with pytest.raises(InputError, match="no manifest.json"):
        read_manifest(tmp_path / "photos")


def test_which_outs_are_folders(tmp_path):
    assert is_folder_target("out/") and is_folder_target("deploy") and is_folder_target(str(tmp_path))
    assert not is_folder_target("model.onnx") and not is_folder_target("sub/Model.ONNX")


def test_a_file_over_the_protobuf_limit_deploys_with_its_data_file(tmp_path, monkeypatch):
    """Export writes NAME.onnx + NAME.onnx.data over the 2 GB limit; the folder lists (and moves) both."""
    import torch

    import fxcompress
    from fxcompress.export import external

    monkeypatch.setattr(external, "PROTOBUF_LIMIT", 1024)  # every model is "large"
    result = fxcompress.compile(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).eval(), (torch.randn(1, 64),))
    with OutputFolder(tmp_path / "out") as folder:
        result.export_onnx(folder.path("model.onnx"))
        folder.add_external_data()
        folder.write_json("manifest.json", _manifest("default"))
    assert folder.files == ["model.onnx", "model.onnx.data", "manifest.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
