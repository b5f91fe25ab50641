"""The CUDA execution-provider path: IO binding, synchronized timing, per-node placement.

Most tests mock onnxruntime (a fake InferenceSession / IO binding / OrtValue) so the CUDA code
path runs on machines without a GPU; those marked ``cuda`` need the real CUDA provider and skip
unless it is active.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxcompress
from fxcompress.runtime.placement import COMPUTE_OPS, node_placement, parse_profile
from fxcompress.runtime.session import ProviderFallbackWarning, create_session
from fxcompress.runtime.timing import benchmark, make_runner, make_torch_runner
from tests.models import ConvBnRelu, randomize_bn
from tests.runtime.test_session import cuda_active, onnx_file  # noqa: F401 - onnx_file is a fixture

# ---------------------------------------------------------------------------------------------
# A fake ORT that claims the CUDA provider and records what the code asks of it.
# ---------------------------------------------------------------------------------------------


class FakeBinding:
    def __init__(self, log: list) -> None:
        self.log = log

    def bind_ortvalue_input(self, name, value):
        self.log.append(("bind_input", name, value.device))

    def bind_output(self, name, device_type="cpu", device_id=0):
        self.log.append(("bind_output", name, device_type, device_id))

    def synchronize_inputs(self):
        self.log.append("sync_inputs")

    def synchronize_outputs(self):
        self.log.append("sync_outputs")


class FakeSession:
    """Stands in for ort.InferenceSession; every requested provider is 'available'."""

    instances: list["FakeSession"] = []

    def __init__(self, source, sess_options=None, providers=None, **_):
        self.requested = list(providers or [])
        self.options = sess_options
        self.log: list = []
        FakeSession.instances.append(self)

    def get_providers(self):
        return self.requested

    def get_inputs(self):
        return [SimpleNamespace(name="x", type="tensor(float)", shape=[1, 3, 8, 8])]

    def get_outputs(self):
        return [SimpleNamespace(name="logits")]

    def io_binding(self):
        return FakeBinding(self.log)

    def run_with_iobinding(self, binding):
        self.log.append("run_with_iobinding")

    def run(self, *_args, **_kw):
        raise AssertionError("timing on CUDA must not use session.run (it copies inputs/outputs to and from the host)")


class FakeOrtValue:
    @staticmethod
    def ortvalue_from_numpy(array, device_type="cpu", device_id=0):
        return SimpleNamespace(device=(device_type, device_id), shape=array.shape)


@pytest.fixture
def fake_cuda_ort(monkeypatch):
    FakeSession.instances.clear()
    preloads = []
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(ort, "OrtValue", FakeOrtValue)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloads.append(True), raising=False)
    return SimpleNamespace(sessions=FakeSession.instances, preloads=preloads)


X = np.zeros((1, 3, 8, 8), dtype=np.float32)


def test_cuda_session_requests_cuda_then_cpu_and_preloads_libraries(fake_cuda_ort):
    runtime = create_session(b"model", "cuda")
    assert runtime.requested == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.provider == "cuda" and not runtime.fell_back
    assert fake_cuda_ort.preloads == [True]


def test_cpu_session_does_not_preload_cuda_libraries(fake_cuda_ort):
    create_session(b"model", "cpu")
    assert fake_cuda_ort.preloads == []


def test_cuda_runner_binds_device_memory_once_and_synchronizes_every_run(fake_cuda_ort):
    runtime = create_session(b"model", "cuda")
    run = make_runner(runtime, (X,))
    log = runtime.session.log
    assert log == [("bind_input", "x", ("cuda", 0)), ("bind_output", "logits", "cuda", 0)]
    log.clear()
    run()
    run()
    # Outputs synchronized after each run: the wall-clock time covers the kernels, not their launch.
    assert log == ["sync_inputs", "run_with_iobinding", "sync_outputs"] * 2


def test_benchmark_on_cuda_times_through_io_binding(fake_cuda_ort):
    report = benchmark(b"model", (torch.from_numpy(X),), provider="cuda", warmup=3, runs=7)
    assert report.provider == "cuda" and report.requested_provider == "cuda" and not report.fell_back
    session = fake_cuda_ort.sessions[-1]
    assert session.log.count("run_with_iobinding") == 10
    assert report.runs == 7 and report.p50_ms >= 0


def test_cuda_runner_checks_feeds_before_binding(fake_cuda_ort):
    runtime = create_session(b"model", "cuda")
    with pytest.raises(fxcompress.errors.InputError, match="has dtype float64"):
        make_runner(runtime, (X.astype(np.float64),))


def test_cpu_runner_uses_plain_run(fake_cuda_ort):
    runtime = create_session(b"model", "cpu")
    run = make_runner(runtime, (X,))
    with pytest.raises(AssertionError, match="must not use session.run"):
        run()  # the fake refuses session.run: proves the CPU path takes it and the CUDA path does not


def test_torch_runner_synchronizes_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    run = make_torch_runner(lambda: calls.append("forward"), (), device="cuda")
    run()
    assert calls == ["forward", "sync"]


def test_torch_runner_on_cpu_runs_without_grad():
    model = torch.nn.Linear(4, 2)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    make_torch_runner(model, (torch.randn(1, 4),))()
    assert seen == [False]


# ---------------------------------------------------------------------------------------------
# Placement: which provider ran each node.
# ---------------------------------------------------------------------------------------------


def _event(name, op, provider):
    return {"cat": "Node", "name": f"{name}_kernel_time", "args": {"op_name": op, "provider": provider}}


def test_parse_profile_flags_compute_ops_off_the_gpu():
    events = [
        {"cat": "Session", "name": "model_run"},
        _event("conv1", "Conv", "CUDAExecutionProvider"),
        _event("shape", "Shape", "CPUExecutionProvider"),  # ORT keeps shape math on CPU on purpose
        _event("copy", "MemcpyToHost", "CUDAExecutionProvider"),
        _event("qconv", "QLinearConv", "CPUExecutionProvider"),  # no CUDA kernel: silent fallback
        _event("conv1", "Conv", "CUDAExecutionProvider"),  # a second run: counted once
        {"cat": "Node", "name": "conv1_fence_before", "args": {}},
    ]
    report = parse_profile(events, "cuda")
    assert report.by_provider == {"cuda": 2, "cpu": 2}
    assert report.memcpy_nodes == 1
    assert [n.name for n in report.fallback_nodes] == ["qconv"]
    assert report.fell_back
    assert "FALLBACK" in report.to_text() and "QLinearConv x1" in report.to_text()
    assert report.to_dict()["fallback_ops"] == {"QLinearConv": 1}


def test_parse_profile_shape_ops_on_cpu_are_not_a_fallback():
    report = parse_profile([_event("c", "Conv", "CUDAExecutionProvider"), _event("s", "Shape", "CPUExecutionProvider")], "cuda")
    assert not report.fell_back and "FALLBACK" not in report.to_text()
    assert "Shape" not in COMPUTE_OPS


def test_node_placement_from_a_real_cpu_profile(onnx_file):
    _, x, path = onnx_file
    report = node_placement(path, (x,), "cpu")
    assert report.nodes and set(report.by_provider) == {"cpu"}
    assert any(n.op_type in COMPUTE_OPS for n in report.nodes)
    assert not report.fell_back


def test_node_placement_shows_a_silent_cpu_fallback(onnx_file, monkeypatch):
    """ORT asked for CUDA but running everything on CPU: every compute op is reported."""
    _, x, path = onnx_file
    real = ort.InferenceSession

    class CpuOnly(real):
        def __init__(self, source, sess_options=None, providers=None, **kw):
            super().__init__(source, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", CpuOnly)
    with pytest.warns(ProviderFallbackWarning):
        report = node_placement(path, (x,), "cuda")
    assert report.fell_back
    assert {n.op_type for n in report.fallback_nodes} & {"Conv", "Gemm", "FusedConv"}


# ---------------------------------------------------------------------------------------------
# The real CUDA provider (skipped unless active).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def requires_cuda():
    if not cuda_active():
        pytest.skip("the ONNX Runtime CUDA provider is not active here")


@pytest.mark.cuda
def test_cuda_fp32_runs_every_compute_node_on_the_gpu(requires_cuda, onnx_file):
    _, x, path = onnx_file
    report = benchmark(path, (x,), provider="cuda", warmup=3, runs=20)
    assert report.provider == "cuda" and not report.fell_back and np.isfinite(report.p50_ms)
    placement = node_placement(path, (x,), "cuda")
    assert not placement.fell_back, placement.to_text()


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["fp16", "int8"])
def test_cuda_presets_are_validated_on_the_cuda_provider(requires_cuda, preset, tmp_path):
    from fxcompress.passes.presets import PRESETS

    if preset not in PRESETS:
        pytest.skip(f"preset {preset!r} is not registered")
    model = randomize_bn(ConvBnRelu()).eval()
    x = torch.randn(1, 3, 16, 16)
    calibration = [(torch.randn(1, 3, 16, 16),) for _ in range(8)]
    result = fxcompress.compile(model, (x,), preset, calibration=calibration)
    path = result.export_onnx(tmp_path / f"{preset}.onnx")
    parity = fxcompress.validate(path, result.module, (x,), tolerance=max(result.recipe.tolerance, 1e-2), provider="cuda")
    assert parity.provider == "cuda"
    assert parity.passed, parity.to_text()
    placement = node_placement(path, (x,), "cuda")
    # int8 Q/DQ has no CUDA kernel for every op (docs/design.md decision 6): it must be *reported*.
    print(f"{preset}: {placement.to_text()}")
    if preset == "fp16":
        assert not placement.fell_back, placement.to_text()
