"""Which execution provider ran each node: the check that shows a silent CPU fallback.

``session.get_providers()`` says which providers a session *has*, not which one ran each node. On
the CUDA provider, ORT assigns every node it has no CUDA kernel for (QLinearConv, say, or an op in
an unsupported dtype) to the CPU provider and inserts Memcpy nodes around it, without an error.
A whole-model timing labelled "cuda" can then be mostly CPU work. So we run the model once with
ORT's profiler on and read the provider of every node's kernel event from the profile JSON.

ORT deliberately keeps small shape computations (Shape, Gather on shapes, ...) on the CPU under
CUDA; those are listed but not counted as a fallback. A *compute* op (convolution, matrix
product, attention, normalisation) on the CPU of a CUDA session is the fallback users must see.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import onnx

from fxcompress.runtime.profiling import kernel_events, node_name, profile_events

#: Ops whose placement on the CPU of a GPU session means the heavy work left the GPU.
COMPUTE_OPS = frozenset({
    "Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "FusedConv", "NhwcConv",
    "MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits",
    "Attention", "MultiHeadAttention", "QAttention", "SkipLayerNormalization", "LayerNormalization",
    "BatchNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
})

_SHORT = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu", "TensorrtExecutionProvider": "tensorrt"}


@dataclass
class NodeRun:
    """One node of ORT's optimized graph and the provider whose kernel ran it."""

    name: str
    op_type: str
    provider: str


@dataclass
class PlacementReport:
    """Per-node provider assignment of one session, read from ORT's profiler.

    Attributes:
        requested: short name of the provider the session was asked for ("cuda", "cpu").
        nodes: every node that ran, in first-run order.
    """

    requested: str
    nodes: list[NodeRun] = field(default_factory=list)

    @property
    def by_provider(self) -> dict[str, int]:
        """Node count per provider short name."""
        return dict(Counter(n.provider for n in self.nodes))

    @property
    def memcpy_nodes(self) -> int:
        """Host<->device copies ORT inserted (each one is a transfer on every run)."""
        return sum(1 for n in self.nodes if n.op_type.startswith("Memcpy"))

    @property
    def fallback_nodes(self) -> list[NodeRun]:
        """Compute ops that ran on another provider than the requested one."""
        return [n for n in self.nodes if n.provider != self.requested and n.op_type in COMPUTE_OPS]

    @property
    def fell_back(self) -> bool:
        """True if any compute op left the requested provider (a silent fallback)."""
        return bool(self.fallback_nodes)

    def to_text(self) -> str:
        """One line: nodes per provider, host/device copies, and the compute ops that fell back."""
        counts = ", ".join(f"{count} on {provider}" for provider, count in sorted(self.by_provider.items()))
        line = f"{len(self.nodes)} nodes ran: {counts or 'none'}"
        if self.memcpy_nodes:
            line += f"; {self.memcpy_nodes} host/device copies"
        if self.fell_back:
            ops = Counter(n.op_type for n in self.fallback_nodes)
            listed = ", ".join(f"{op} x{c}" for op, c in ops.most_common())
            line += f"; FALLBACK: compute ops off {self.requested}: {listed}"
        return line

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): counts per provider, copies, and the fallback ops."""
        return {
            "requested": self.requested,
            "by_provider": self.by_provider,
            "memcpy_nodes": self.memcpy_nodes,
            "fell_back": self.fell_back,
            "fallback_ops": dict(Counter(n.op_type for n in self.fallback_nodes)),
        }

    def __str__(self) -> str:
        return self.to_text()


def parse_profile(events: Iterable[dict[str, Any]], requested: str) -> PlacementReport:
    """Build a PlacementReport from the event list of an ORT profile JSON.

    Node kernel events look like ``{"cat": "Node", "name": "<node>_kernel_time", "args":
    {"op_name": "Conv", "provider": "CPUExecutionProvider", ...}}``; each node is counted once
    even when the profile covers several runs.
    """
    seen: dict[str, NodeRun] = {}
    for event in kernel_events(events):
        args = event.get("args") or {}
        provider = args.get("provider")
        if provider is None:
            continue
        name = node_name(event)
        seen.setdefault(name, NodeRun(name, str(args.get("op_name", "?")), _SHORT.get(provider, provider)))
    return PlacementReport(requested, list(seen.values()))


def node_placement(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    inputs: Sequence[Any],
    provider: str = "cpu",
    *,
    runs: int = 1,
) -> PlacementReport:
    """Run ``model`` ``runs`` times with ORT's profiler on and report which provider ran each node.

    The session is created like a timing session (graph optimizations on), so the nodes are those
    of the graph ORT really runs. The profile file is written to a temporary folder and removed.
    """
    events = profile_events(model, inputs, provider, runs=runs)
    # Judged against what was asked for: a session that fell back entirely is all fallback.
    return parse_profile(events, provider)
