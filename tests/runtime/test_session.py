"""Runtime: provider truth (fallback reported), feeds checked, parity and timing reports."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxcompress
from fxcompress.errors import InputError, RuntimeProviderError
from fxcompress.runtime.session import ProviderFallbackWarning, create_session
from tests.models import ConvBnRelu, TwoInputs, randomize_bn


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    model = randomize_bn(ConvBnRelu()).eval()
    x = torch.randn(1, 3, 16, 16)
    path = fxcompress.compile(model, (x,)).export_onnx(tmp_path_factory.mktemp("m") / "m.onnx")
    return model, x, path


def cuda_active() -> bool:
    try:
        return "CUDAExecutionProvider" in create_session_quiet().providers
    except Exception:  # noqa: BLE001
        return False


def create_session_quiet():
    import warnings

    model = randomize_bn(ConvBnRelu()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = fxcompress.compile(model, (torch.randn(1, 3, 8, 8),)).export_onnx(
            __import__("tempfile").mkdtemp() + "/c.onnx"
        )
        return create_session(path, "cuda")


def test_cpu_session_reports_cpu(onnx_file):
    _, _, path = onnx_file
    runtime = create_session(path, "cpu")
    assert runtime.providers == ["CPUExecutionProvider"]
    assert runtime.provider == "cpu" and not runtime.fell_back


def test_fallback_from_cuda_is_reported_loudly(onnx_file, monkeypatch):
    """A session that asked for CUDA and got CPU says so (mocked where a GPU exists)."""
    _, x, path = onnx_file
    real = ort.InferenceSession

    class CpuOnly(real):  # what ORT does when the CUDA libraries cannot be loaded
        def __init__(self, source, sess_options=None, providers=None, **kw):
            super().__init__(source, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", CpuOnly)
    with pytest.warns(ProviderFallbackWarning, match="Requested CUDAExecutionProvider"):
        report = fxcompress.benchmark(path, (x,), provider="cuda", warmup=1, runs=3)
    assert report.provider == "cpu"
    assert report.requested_provider == "cuda"
    assert report.fell_back
    assert "FELL BACK" in report.to_text()


def test_unknown_provider():
    with pytest.raises(RuntimeProviderError, match="Unknown provider 'tpu'"):
        create_session(b"", "tpu")


def test_benchmark_report(onnx_file):
    _, x, path = onnx_file
    report = fxcompress.benchmark(path, (x,), warmup=2, runs=20)
    assert report.runs == 20 and report.provider == "cpu" and not report.fell_back
    assert 0 < report.p50_ms <= report.p90_ms <= report.p99_ms
    assert report.throughput > 0


def test_validate_report_fields(onnx_file):
    model, x, path = onnx_file
    report = fxcompress.validate(path, model, (x,), random_inputs=2)
    assert report.passed and report.runs == 3
    assert report.cosine > 0.99999
    assert report.top1_agreement == 1.0
    assert report.nonfinite == 0
    assert report.max_abs < 1e-4


def test_validate_headline_figures_are_the_worst_per_output_figures(onnx_file):
    model, x, path = onnx_file
    report = fxcompress.validate(path, model, (x,), random_inputs=1, real_inputs=[(x * 0.5,), (x + 1,)])
    real = report.comparisons[:len(report.real_inputs)]
    assert len(real) == 3 and report.inputs[-1] == "random 1"
    # Read off ``outputs`` (pooled over the real sets), they agree with the per-run comparisons.
    assert report.max_abs == max(c.judged.max_abs for run in real for c in run)
    assert report.drift == max(o.judged_drift for o in report.outputs) and report.unmasked_drift == report.drift
    assert report.tolerance == report.gate.drift
    top1 = [c.top1_agreement for run in real for c in run if c.top1_agreement is not None]
    assert report.top1_agreement == (min(top1) if top1 else None)
    data = report.to_dict()
    assert set(data) == {"passed", "tolerance", "max_abs", "max_rel", "drift", "cosine", "top1_agreement", "nonfinite",
                         "runs", "provider", "unmasked_drift", "inputs", "rel_rms", "random_drift", "random_rel_rms",
                         "failures", "masked", "gate", "outputs"}
    assert data["drift"] == report.drift and data["outputs"][0]["drift"] == report.outputs[0].drift
    json.dumps(data)


def test_validate_detects_a_different_model(onnx_file):
    _, x, path = onnx_file
    torch.manual_seed(123)
    other = randomize_bn(ConvBnRelu(), seed=7).eval()
    report = fxcompress.validate(path, other, (x,))
    assert not report.passed
    assert report.drift > 1e-2


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        ((torch.randn(1, 3, 16, 16), torch.randn(1)), "takes 1 input"),
        ((torch.randn(1, 3, 8, 8),), "has shape [1, 3, 8, 8] but the model expects [1, 3, 16, 16]"),
        ((torch.randn(1, 3, 16, 16).double(),), "has dtype float64 but the model expects float32"),
    ],
)
def test_wrong_inputs_get_clear_errors(onnx_file, inputs, fragment):
    _, _, path = onnx_file
    with pytest.raises(InputError) as info:
        fxcompress.benchmark(path, inputs, warmup=0, runs=1)
    assert fragment in str(info.value)


def test_integer_inputs_validate(tmp_path):
    model = TwoInputs().eval()
    ids, feats = torch.randint(0, 50, (2, 5)), torch.randn(2, 4)
    path = fxcompress.compile(model, (ids, feats)).export_onnx(tmp_path / "two.onnx")
    report = fxcompress.validate(path, model, (ids, feats))
    assert report.passed


@pytest.mark.cuda
def test_cuda_provider_really_runs(onnx_file):
    if not cuda_active():
        pytest.skip("the ONNX Runtime CUDA provider is not active on this machine")
    _, x, path = onnx_file
    report = fxcompress.benchmark(path, (x,), provider="cuda", warmup=2, runs=10)
    assert report.provider == "cuda" and not report.fell_back
    assert np.isfinite(report.p50_ms)
