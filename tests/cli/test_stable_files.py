"""Files that are stable to deploy against: output names that do not depend on the recipe, and a
preset that changes nothing says so (with the reason) in the report and the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import fxcompress
from fxcompress.cli import main
from tests.models import conv_bn_relu


def _output_names(result, tmp_path, name) -> list[str]:
    return [o.name for o in onnx.load(str(result.export_onnx(tmp_path / f"{name}.onnx"))).graph.output]


def test_output_names_are_the_same_under_every_preset(tmp_path):
    model, inputs = conv_bn_relu()
    names = {recipe: _output_names(fxcompress.compile(model, inputs, recipe, calibration=[inputs] * 2), tmp_path, recipe)
             for recipe in ("default", "fp16", "int8")}
    assert names == {"default": ["output_0"], "fp16": ["output_0"], "int8": ["output_0"]}


def test_a_preset_that_changes_nothing_says_why(tmp_path, capsys):
    model, inputs = conv_bn_relu()  # convolutions only: int8-dynamic quantizes linear layers
    result = fxcompress.compile(model, inputs, "int8-dynamic")
    assert result.report.note is not None and "no linear layers for int8-dynamic; try int8" in result.report.note
    assert result.report.to_dict()["note"] == result.report.note
    assert fxcompress.compile(model, inputs, "int8", calibration=[inputs] * 2).report.note is None
    assert fxcompress.compile(model, inputs, "default").report.note is None  # nothing lossy was asked for

    assert main(["compile", "tests.models:conv_bn_relu", "--recipe", "int8-dynamic", "--out", str(tmp_path / "m.onnx"),
                 "--no-baseline", "--runs", "4"]) == 0
    assert "Note: recipe 'int8-dynamic' changed nothing lossy on this model: no linear layers" in capsys.readouterr().out


def test_dynamic_axes_make_image_height_and_width_dynamic(tmp_path, capsys):
    import numpy as np
    import onnxruntime as ort
    import torch

    out = tmp_path / "m.onnx"
    assert main(["compile", "tests.models:conv_bn_relu", "--dynamic-axes", "x:2=height,3=width", "--out", str(out),
                 "--no-baseline", "--runs", "4"]) == 0
    capsys.readouterr()
    model = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, "height", "width"]
    torch_model, _ = conv_bn_relu()
    for size in ((20, 28), (33, 17)):
        x = torch.randn(1, 3, *size)
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        assert np.allclose(got, torch_model(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("value, message", [("x:two", "INPUT:AXIS"), ("nope:2", "not inputs of the model"),
                                            ("x:7=h", "has 4 axes")])
def test_bad_dynamic_axes(value, message, tmp_path, capsys):
    assert main(["compile", "tests.models:conv_bn_relu", "--dynamic-axes", value, "--out", str(tmp_path / "m.onnx")]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unused_inputs_are_dropped_unless_kept(tmp_path, capsys):
    import onnxruntime as ort

    dropped, kept = tmp_path / "dropped.onnx", tmp_path / "kept.onnx"
    assert main(["compile", "tests.frontdoor_models:unused_input", "--out", str(dropped), "--no-baseline", "--runs", "4"]) == 0
    assert "Dropped the unused input(s) unused" in capsys.readouterr().out
    assert main(["compile", "tests.frontdoor_models:unused_input", "--out", str(kept), "--keep-unused-inputs",
                 "--no-baseline", "--runs", "4"]) == 0
    capsys.readouterr()
    assert [i.name for i in onnx.load(str(dropped)).graph.input] == ["x"]
    assert [i.name for i in onnx.load(str(kept)).graph.input] == ["x", "unused"]
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    got = ort.InferenceSession(str(dropped), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(kept), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "unused": np.zeros((1, 2), np.float32)})[0]
    assert np.array_equal(got, want)
