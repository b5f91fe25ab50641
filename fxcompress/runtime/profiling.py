"""ONNX Runtime's profiler, read back: the kernel events of the graph ORT really runs.

Two questions are answered from the same events: which provider ran each node
(runtime.placement) and where the time goes, per op type (``op_times`` here). A whole-model
latency says how fast; this says which kernels, after ORT's own fusions and layout changes
(QLinearConv in NHWC, inserted Transposes, ...), took it. benchmarks/pruning.py uses it to show
why a pruned int8 ResNet-50 is not 4x faster than the dense one.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import onnx

from fxcompress.errors import RuntimeProviderError

_KERNEL_SUFFIX = "_kernel_time"


def profile_events(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    inputs: Sequence[Any],
    provider: str = "cpu",
    *,
    runs: int = 1,
    warmup: int = 0,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run ``model`` ``warmup`` + ``runs`` times with ORT's profiler on; return the events of the last ``runs``.

    ORT's profiler cannot be switched on after the session starts, so warm-up runs are profiled
    too; their events are dropped here by keeping only the last ``runs`` kernel events of each
    node. The session is created like a timing session (graph optimizations on), and the profile
    file goes to a temporary folder that is removed.
    """
    from fxcompress.runtime.session import create_session

    with tempfile.TemporaryDirectory(prefix="fxcompress-profile-") as folder:
        runtime = create_session(model, provider, optimize=True, threads=threads,
                                 profile_prefix=Path(folder) / "profile")
        feeds = runtime.feeds(inputs)
        for _ in range(warmup + max(1, runs)):
            runtime.session.run(None, feeds)
        path = runtime.session.end_profiling()
        try:
            with open(path, encoding="utf-8") as handle:
                events = json.load(handle)
        except (OSError, ValueError) as exc:
            raise RuntimeProviderError(
                f"ONNX Runtime's profile could not be read ({exc}), so the per-node figures are unknown.",
                "check that the temporary folder is writable; these figures need ORT's profiler.",
            ) from None
    # Older ORT versions wrap the list as {"traceEvents": [...]}.
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    return _last_runs(events, max(1, runs))


def kernel_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-node kernel events (``{"cat": "Node", "name": "<node>_kernel_time", ...}``)."""
    return [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(_KERNEL_SUFFIX)]


def node_name(event: dict[str, Any]) -> str:
    """The graph node a kernel event belongs to."""
    return str(event["name"])[: -len(_KERNEL_SUFFIX)]


def _last_runs(events: Sequence[dict[str, Any]], runs: int) -> list[dict[str, Any]]:
    """Keep the last ``runs`` kernel events of every node (the warm-up ones go) and every other event."""
    kernels = kernel_events(events)
    per_node: dict[str, list[int]] = defaultdict(list)
    for index, event in enumerate(kernels):
        per_node[node_name(event)].append(index)
    dropped = {id(kernels[i]) for indices in per_node.values() for i in indices[:-runs]}
    return [event for event in events if id(event) not in dropped]


@dataclass(frozen=True)
class OpTypeTime:
    """Kernel time of one op type in one run: the sum over its nodes of each node's median."""

    op_type: str
    nodes: int
    ms: float


@dataclass(frozen=True)
class OpTimes:
    """Where one run's kernel time goes, per op type, largest first."""

    rows: tuple[OpTypeTime, ...]
    runs: int
    threads: int | None

    @property
    def total_ms(self) -> float:
        """Sum of all kernels of one run (less than wall time: it leaves out ORT's own overhead)."""
        return sum(row.ms for row in self.rows)

    def ms(self, op_type: str) -> float:
        """Kernel time of ``op_type`` (0 when the graph has none)."""
        return next((row.ms for row in self.rows if row.op_type == op_type), 0.0)

    def to_text(self) -> str:
        """A text table: op type, nodes, ms per run, share of the kernel total."""
        total = self.total_ms or 1.0
        threads = "ORT's default" if self.threads is None else str(self.threads)
        lines = [f"kernel time per op type (ORT profiler, median of {self.runs} runs, threads: {threads})",
                 f"{'op type':28s} {'nodes':>5s} {'ms':>8s} {'share':>6s}"]
        lines += [f"{row.op_type:28s} {row.nodes:5d} {row.ms:8.3f} {row.ms / total:6.1%}" for row in self.rows]
        lines.append(f"{'total':28s} {sum(r.nodes for r in self.rows):5d} {self.total_ms:8.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (benchmarks store it)."""
        return {"runs": self.runs, "threads": self.threads, "total_ms": self.total_ms,
                "ops": {row.op_type: {"nodes": row.nodes, "ms": row.ms} for row in self.rows}}

    def __str__(self) -> str:
        return self.to_text()


def summarize_op_times(events: Sequence[dict[str, Any]], runs: int, threads: int | None = None) -> OpTimes:
    """Per op type: the sum over its nodes of the median kernel time (medians resist a stray slow run)."""
    durations: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    for event in kernel_events(events):
        name = node_name(event)
        durations[name].append(float(event.get("dur", 0)) / 1e3)  # profiler durations are microseconds
        op_of.setdefault(name, str((event.get("args") or {}).get("op_name", "?")))
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, values in durations.items():
        totals[op_of[name]] += statistics.median(values)
        counts[op_of[name]] += 1
    rows = sorted((OpTypeTime(op, counts[op], totals[op]) for op in totals), key=lambda row: -row.ms)
    return OpTimes(tuple(rows), runs, threads)


def op_times(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    inputs: Sequence[Any],
    provider: str = "cpu",
    *,
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
) -> OpTimes:
    """Kernel time per op type of ``model`` in ORT (graph optimizations on, as when timing).

    ``threads`` sets ORT's intra-op threads (None: its default, one per core). The profiler adds
    a little time to every kernel, so compare these figures with each other, not with a latency
    measured without it.
    """
    events = profile_events(model, inputs, provider, runs=runs, warmup=warmup, threads=threads)
    return summarize_op_times(events, runs, threads)
