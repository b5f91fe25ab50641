"""Files that are stable to deploy against: output names that do not depend on the recipe, and a
preset that changes nothing says so (with the reason) in the report and the CLI."""

from __future__ import annotations

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
                 "--no-baseline", "--iters", "4"]) == 0
    assert "Note: recipe 'int8-dynamic' changed nothing lossy on this model: no linear layers" in capsys.readouterr().out
