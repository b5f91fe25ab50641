"""Files that are stable to deploy against: output names that do not depend on the recipe, and a
preset that changes nothing says so (with the reason) in the report and the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

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


class _ReadsItsFirstAndThirdInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, unused: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.linear(x) - y[:, :3]


def test_api_export_drops_unused_inputs_and_feeds_by_name(tmp_path):
    """The unused input sits between two used ones of the same shape: a feed by position would
    silently give ``unused`` to ``y``; by the recorded names each value reaches its input."""
    torch.manual_seed(0)
    model = _ReadsItsFirstAndThirdInputs().eval()
    inputs = (torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 4))
    result = fxcompress.compile(model, inputs)
    dropped = result.export_onnx(tmp_path / "dropped.onnx")
    assert result.report.extra["dropped_inputs"] == ["unused"]
    proto = onnx.load(str(dropped))
    assert [i.name for i in proto.graph.input] == ["x", "y"]
    assert {p.key: p.value for p in proto.metadata_props}["fxcompress_dropped_inputs"] == "unused"
    kept = result.export_onnx(tmp_path / "kept.onnx", keep_unused_inputs=True)
    assert [i.name for i in onnx.load(str(kept)).graph.input] == ["x", "unused", "y"]
    assert result.report.extra["dropped_inputs"] == []

    want = model(*inputs).detach().numpy()
    for path in (dropped, kept):  # the same positional inputs serve both files
        assert fxcompress.validate(path, model, inputs).passed
        assert fxcompress.benchmark(path, inputs, warmup=1, runs=2).p50_ms > 0
    from fxcompress.runtime.session import create_session

    runtime = create_session(dropped)
    assert sorted(runtime.feeds(inputs)) == ["x", "y"]
    assert np.allclose(runtime.run(inputs)[0], want, atol=1e-6)
    assert sorted(runtime.feeds(inputs[::2])) == ["x", "y"]  # the file's own two inputs, in its order
    with pytest.raises(fxcompress.InputError, match="takes 2 input"):
        runtime.feeds(inputs[:1])  # neither the recorded three nor the file's two


def test_export_parity_checks_each_dynamic_axis_at_a_second_size(tmp_path, monkeypatch):
    """Parity runs at the example size and again at another size per named dimension; a file
    that fits only the example size is refused at the size it fails, nothing written."""
    import dataclasses

    import onnxruntime as ort

    import fxcompress.api as api

    model, (x,) = conv_bn_relu()
    result = fxcompress.compile(model, (x,), options=fxcompress.CompileOptions(dynamic_axes={"x": {2: "height", 3: "width"}}))
    path = result.export_onnx(tmp_path / "m.onnx")
    height, width = x.shape[2], x.shape[3]
    assert result.report.extra["parity_shapes"] == ["example", f"height={height + height // 2}", f"width={width + width // 2}"]
    other = torch.randn(1, 3, height * 2 + 1, width - 3)  # a size parity did not use
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": other.numpy()})[0]
    assert np.allclose(got, model(other).detach().numpy(), atol=1e-5)

    batched = fxcompress.compile(model, torch.cat([x, x]), options=fxcompress.CompileOptions(dynamic_batch=True))
    batched.export_proto()
    assert batched.report.extra["parity_shapes"] == ["example", "batch=3"]
    batched.export_proto(dynamic_batch=False)  # a file with a fixed batch is checked at that batch alone
    assert batched.report.extra["parity_shapes"] == ["example"]

    checked = api.validate_onnx

    def only_at_the_example_size(model_, module, inputs, **options):
        report = checked(model_, module, inputs, **options)
        return report if inputs[0].shape[2] == height else dataclasses.replace(report, passed=False)

    monkeypatch.setattr(api, "validate_onnx", only_at_the_example_size)
    with pytest.raises(fxcompress.ExportError, match=f"at height={height + height // 2}"):
        result.export_onnx(tmp_path / "never.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


class _NeedsAMultipleOfFour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, 4)).sum(-1)


def test_second_size_is_one_the_model_takes():
    from fxcompress.capture import other_size

    x = torch.randn(1, 8)
    size, (resized,) = other_size(_NeedsAMultipleOfFour(), (x,), [(0, 1)])
    assert size == 12 and torch.equal(resized[:, :8], x) and torch.equal(resized[:, 8:], x[:, -1:].expand(1, 4))
    assert other_size(_NeedsAMultipleOfFour(), (torch.randn(1, 4),), [(0, 1)])[0] == 8  # 6 does not divide: twice
    assert other_size(lambda t: t.view(1, 2, 2), (torch.randn(1, 4),), [(0, 1)]) is None
