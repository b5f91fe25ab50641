"""ORT's profiler read back: warm-up events dropped, kernel time summed per op type."""

from __future__ import annotations

import pytest

from fxcompress.runtime.profiling import _last_runs, kernel_events, op_times, profile_events, summarize_op_times
from tests.runtime.test_session import onnx_file  # noqa: F401 - a fixture


def _kernel(name, op, dur_us):
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur_us, "args": {"op_name": op}}


def test_summary_sums_node_medians_per_op_type():
    events = [
        {"cat": "Session", "name": "model_run", "dur": 999},  # not a kernel: ignored
        _kernel("conv_a", "QLinearConv", 100), _kernel("conv_b", "QLinearConv", 50), _kernel("add", "QLinearAdd", 10),
        _kernel("conv_a", "QLinearConv", 300), _kernel("conv_b", "QLinearConv", 50), _kernel("add", "QLinearAdd", 30),
        _kernel("conv_a", "QLinearConv", 200), _kernel("conv_b", "QLinearConv", 70), _kernel("add", "QLinearAdd", 20),
        {"cat": "Node", "name": "conv_a_fence_before", "dur": 5, "args": {"op_name": "QLinearConv"}},
    ]
    times = summarize_op_times(events, runs=3, threads=2)
    # medians: conv_a 200 us, conv_b 50 us -> 0.25 ms over 2 nodes; add 20 us
    assert [(r.op_type, r.nodes) for r in times.rows] == [("QLinearConv", 2), ("QLinearAdd", 1)]
    assert times.ms("QLinearConv") == pytest.approx(0.25)
    assert times.ms("QLinearAdd") == pytest.approx(0.02)
    assert times.ms("Gemm") == 0.0
    assert times.total_ms == pytest.approx(0.27)
    assert times.to_dict()["ops"]["QLinearConv"] == {"nodes": 2, "ms": pytest.approx(0.25)}


def test_warmup_kernel_events_are_dropped():
    events = [_kernel("a", "Conv", 1000), _kernel("b", "Relu", 900),  # warm-up run: slow, first
              _kernel("a", "Conv", 10), _kernel("b", "Relu", 9), {"cat": "Session", "name": "model_run"}]
    kept = _last_runs(events, runs=1)
    assert [e.get("dur") for e in kernel_events(kept)] == [10, 9]
    assert {"cat": "Session", "name": "model_run"} in kept


def test_op_times_of_a_real_cpu_session(onnx_file):
    _, x, path = onnx_file
    events = profile_events(path, (x,), runs=3, warmup=2, threads=1)
    per_node = {}
    for event in kernel_events(events):
        per_node[event["name"]] = per_node.get(event["name"], 0) + 1
    assert per_node and set(per_node.values()) == {3}  # the 2 warm-up runs are gone
    times = op_times(path, (x,), runs=3, warmup=1, threads=1)
    assert times.total_ms > 0 and times.threads == 1 and times.runs == 3
    assert any(row.op_type in ("Conv", "FusedConv") for row in times.rows)
    assert all(row.ms >= 0 and row.nodes >= 1 for row in times.rows)
