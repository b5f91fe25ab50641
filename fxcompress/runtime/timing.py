"""Latency measurement on ONNX Runtime, and interleaved timing for side-by-side comparisons.

On 2-core machines back-to-back runs drift by 30%, so comparisons are timed interleaved in one
process: blocks of runs of each variant in turn, a warm-up before each block and a short pause
between blocks, the median over all timed runs (docs/design.md, "How to time").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from fxcompress.inputs import model_call
from fxcompress.errors import InputError
from fxcompress.runtime.session import RuntimeSession, create_session, to_numpy


@dataclass
class LatencyReport:
    """Latency percentiles in milliseconds, throughput, and the provider that really ran."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float
    runs: int
    batch_size: int
    provider: str
    requested_provider: str
    fell_back: bool

    def to_text(self) -> str:
        """One line: percentiles, throughput and the provider that ran (saying so where it fell back)."""
        fallback = f" (requested {self.requested_provider}, FELL BACK)" if self.fell_back else ""
        return (f"p50 {self.p50_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, p99 {self.p99_ms:.3f} ms, "
                f"{self.throughput:.1f} samples/s on {self.provider}{fallback}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): every field."""
        return dict(self.__dict__)

    def __str__(self) -> str:
        return self.to_text()


def latency_stats(samples_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """Percentiles and throughput of a list of per-run latencies."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "throughput": float(batch_size * 1000.0 / arr.mean()) if arr.mean() > 0 else float("inf"),
    }


def make_runner(runtime: RuntimeSession, inputs: Sequence[Any]) -> Callable[[], Any]:
    """A zero-argument callable running one inference.

    On CUDA, inputs and outputs are bound to device memory with IO binding so the timing measures
    the model rather than host<->device copies, and each run synchronizes before returning.
    """
    feeds = runtime.feeds(inputs)
    session = runtime.session
    if runtime.provider != "cuda":
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def run_bound() -> None:
        # Inputs are bound once and stay on the device; run_with_iobinding returns when ORT has
        # queued the work, so synchronize_outputs is what makes a wall-clock timing honest.
        binding.synchronize_inputs()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run_bound


def make_torch_runner(module: Any, inputs: Sequence[Any], device: str = "cpu") -> Callable[[], Any]:
    """A zero-argument callable running ``module`` (a torch model or GraphModule) once in PyTorch.

    ``module`` must already be on ``device`` and in eval mode; the inputs are moved there once.
    On CUDA each run synchronizes the device before returning, so wall-clock timing covers the
    kernels, not just their launch.
    """
    import torch

    placed = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    synchronize = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def run_torch() -> None:
        with torch.inference_mode():
            module(*placed)
        synchronize()

    return run_torch


def benchmark(
    onnx_model: str | os.PathLike | bytes | onnx.ModelProto,
    example_inputs: Any,
    *,
    provider: str = "cpu",
    warmup: int = 10,
    runs: int = 100,
) -> LatencyReport:
    """Time ``runs`` runs after ``warmup`` runs, with ORT graph optimizations on.

    The report names the provider that actually ran; if CUDA was requested but unavailable,
    ``fell_back`` is True and a ProviderFallbackWarning was issued.
    """
    inputs = model_call(None, example_inputs).flat  # keyword / nested inputs: in the ONNX file's order
    if not (isinstance(runs, int) and runs >= 1 and isinstance(warmup, int) and warmup >= 0):
        raise InputError(f"benchmark needs runs >= 1 and warmup >= 0, got runs={runs!r}, warmup={warmup!r}.",
                         "use e.g. runs=100, warmup=10 (--runs / --warmup on the command line).")
    if isinstance(onnx_model, (str, os.PathLike)):
        from fxcompress.export.onnx_export import load_onnx

        onnx_model = load_onnx(onnx_model)
    runtime = create_session(onnx_model, provider, optimize=True)
    run = make_runner(runtime, inputs)
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000.0)
    batch = int(to_numpy(inputs[0]).shape[0]) if to_numpy(inputs[0]).ndim else 1
    return LatencyReport(
        **latency_stats(samples, batch),
        runs=runs,
        batch_size=batch,
        provider=runtime.provider,
        requested_provider=provider,
        fell_back=runtime.fell_back,
    )


def time_interleaved(
    runners: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 10,
    block: int = 8,
    warmup: int = 2,
    pause_s: float = 0.05,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """Time several variants side by side: ``rounds`` x (each variant: warm-up, ``block`` timed runs).

    Returns per label the stats of :func:`latency_stats` over all ``rounds * block`` timed runs.
    """
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            for _ in range(warmup):
                run()
            for _ in range(block):
                start = time.perf_counter()
                run()
                samples[label].append((time.perf_counter() - start) * 1000.0)
            time.sleep(pause_s)
    return {label: latency_stats(s, batch_size) for label, s in samples.items()}
