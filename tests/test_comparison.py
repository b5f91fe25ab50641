"""fxcompress.compare: the compiled model beside the plain export of the original, as an API."""

from __future__ import annotations

import json

import pytest
import torch

import fxcompress
from fxcompress.comparison import BASELINE_LABEL
from tests.models import conv_bn_relu


@pytest.fixture(scope="module")
def compiled():
    model, inputs = conv_bn_relu()
    return model, fxcompress.compile(model, inputs, "default")


def test_compare_in_memory_with_baseline(compiled):
    model, result = compiled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fxcompress.compare(result, model, runs=16)
    assert [v.label for v in report.variants] == [BASELINE_LABEL, "fxcompress default"]
    for variant in report.variants:
        assert variant.parity.passed, variant.parity.to_text()
        assert 0 < variant.p50_ms <= variant.p90_ms
        assert variant.size_bytes > 0
        assert variant.provider == "cpu"
    assert report.runs == 16 and not report.fell_back
    assert report.speedup == pytest.approx(report.variants[0].p50_ms / report.compiled.p50_ms)
    text = report.to_text()
    assert "cpu provider" in text and BASELINE_LABEL in text and "speedup over plain export" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["variants"][1]["parity"]["passed"] is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched


def test_compare_a_written_file_without_baseline(compiled, tmp_path):
    model, result = compiled
    path = result.export_onnx(tmp_path / "m.onnx")
    report = fxcompress.compare(result, model, path, baseline=False, runs=8)
    assert len(report.variants) == 1 and report.speedup is None
    assert report.compiled.size_bytes == path.stat().st_size


def test_compare_shows_a_lossy_presets_drift():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    inputs = (torch.randn(2, 16),)
    result = fxcompress.compile(model, inputs, "int8-dynamic")
    report = fxcompress.compare(result, model, runs=8)
    assert report.compiled.parity.drift > 1e-4  # int8 differs from the original, within the recipe's bound
    assert report.compiled.parity.passed
    assert report.variants[0].parity.drift < 1e-4
    assert report.compiled.parity.tolerance == pytest.approx(result.recipe.tolerance)
    assert report.compiled.parity.gate == result.recipe.gate
    # the tolerance given to compile governs compare too, as it does export
    loose = fxcompress.compile(model, inputs, "int8-dynamic", tolerance=0.5)
    assert fxcompress.compare(loose, model, runs=8).compiled.parity.tolerance == pytest.approx(0.5)


@pytest.mark.parametrize("args, fragment", [
    (("not a result", torch.nn.Linear(2, 2)), "expected the CompileResult"),
    (("RESULT", "not a model"), "must be a torch.nn.Module"),
    (("RESULT", "MODEL", "/nonexistent/m.onnx"), "does not exist"),
])
def test_bad_input_is_one_clear_error(compiled, args, fragment):
    model, result = compiled
    args = tuple(result if a == "RESULT" else model if a == "MODEL" else a for a in args)
    with pytest.raises(fxcompress.InputError, match=fragment):
        fxcompress.compare(*args, runs=8)
