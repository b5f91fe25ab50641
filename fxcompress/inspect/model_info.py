"""Model inspection: what a model is made of, for ``fxcompress inspect MODEL``.

For an ONNX file: op histogram, parameters, multiply-accumulates, file size, the share of MACs
that run quantized (int8 kernels, or float ops between DequantizeLinear inputs that ONNX Runtime
fuses into int8 kernels), the share of weights that are zero, opsets, and which execution
providers can actually run it here (a session is created on each; ORT's silent fallback to the
CPU is reported as such). For a PyTorch model or GraphModule: the same figures from the captured
graph, without opset and providers.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from fxcompress.inspect.onnx_graph import QUANTIZED_OPS, OnnxGraph, read_model, type_text
from fxcompress.inspect.text_style import Style
from fxcompress.analysis.snapshot import GraphSnapshot


@dataclass
class ModelInfo:
    """Inspection figures of one model. Shares are fractions in [0, 1]."""

    name: str
    kind: str  # "onnx" or "graph"
    nodes: int
    histogram: Counter
    parameters: int
    macs: int
    quantized_mac_share: float
    sparse_share: float
    file_bytes: int | None = None
    opsets: dict[str, int] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    weight_dtypes: dict[str, int] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): every figure, the op histogram as a dict."""
        out = dict(self.__dict__)
        out["histogram"] = dict(self.histogram)
        return out

    def to_text(self, *, color: bool = False) -> str:
        """The figures, the providers' verdicts, the op histogram and the metadata, one per line
        (what ``fxcompress inspect MODEL`` prints; ``color`` for a terminal, see ``text_style.use_color``)."""
        style = Style(color)
        lines = [style(f"{self.name}", "head")]
        if self.file_bytes is not None:
            lines.append(f"  file size        {self.file_bytes / 1e6:.3f} MB ({self.file_bytes:,} bytes)")
        if self.opsets:
            lines.append("  opsets           " + ", ".join(f"{d} {v}" for d, v in self.opsets.items()))
        lines += [f"  nodes            {self.nodes:,}",
                  f"  parameters       {self.parameters:,}",
                  f"  MACs             {self.macs:,} ({self.macs / 1e9:.3f} G)",
                  f"  quantized MACs   {self.quantized_mac_share * 100:.1f}%",
                  f"  zero weights     {self.sparse_share * 100:.1f}% (of elements in tensors with 2+ dims)"]
        if self.weight_dtypes:
            lines.append("  stored dtypes    " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.weight_dtypes.items())))
        for label, values in (("inputs", self.inputs), ("outputs", self.outputs)):
            if values:
                lines.append(f"  {label:<16} " + "; ".join(values))
        if self.providers:
            lines.append(style("Execution providers (a session was created on each):", "head"))
            for provider, verdict in self.providers.items():
                tone = "added" if verdict == "runs it" else "changed"
                lines.append("  " + style(f"{provider:<24} {verdict}", tone))
        lines.append(style("Op histogram:", "head"))
        for op, count in self.histogram.most_common():
            lines.append(f"  {op:<32} {count:>6}")
        if self.metadata:
            lines.append(style("Metadata:", "head"))
            lines += [f"  {k} = {v}" for k, v in sorted(self.metadata.items())]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _weight_figures(arrays: list[np.ndarray]) -> tuple[float, dict[str, int]]:
    """(share of zero elements in weight tensors, elements per dtype). Weights: 2-D or more."""
    dtypes: Counter = Counter()
    zeros = total = 0
    for array in arrays:
        dtypes[array.dtype.name] += array.size
        if array.ndim >= 2:  # biases and scales are not where sparsity lives
            total += array.size
            zeros += int(array.size - np.count_nonzero(array))
    return (zeros / total if total else 0.0), dict(dtypes)


def _fed_by_dequantize(graph: OnnxGraph, node) -> bool:
    proto = graph.protos[node.name]
    # QDQ format: both the activation and the weight come from DequantizeLinear.
    feeds = [graph.protos.get(graph.producer.get(t, "")) for t in proto.input[:2]]
    return len(feeds) == 2 and all(f is not None and f.op_type == "DequantizeLinear" for f in feeds)


def _provider_truth(model: onnx.ModelProto) -> dict[str, str]:
    import onnxruntime as ort

    from fxcompress.errors import RuntimeProviderError
    from fxcompress.runtime.session import PROVIDERS, create_session

    available = set(ort.get_available_providers())
    verdicts = {}
    for short, full in PROVIDERS.items():
        if full not in available:
            verdicts[full] = "not in this onnxruntime build"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = create_session(model, short, optimize=False)
        except RuntimeProviderError as exc:
            verdicts[full] = f"cannot load the model: {exc.problem}"
            continue
        verdicts[full] = (f"unusable here: the session fell back to {session.providers[0]}"
                          if session.fell_back else "runs it")
    return verdicts


def inspect_onnx(source: str | os.PathLike | onnx.ModelProto, *, check_providers: bool = True) -> ModelInfo:
    """Inspect an ONNX file or ModelProto. ModelFileError for a missing or unreadable file."""
    model, path = read_model(source)
    graph = OnnxGraph(model, path)
    macs = sum(n.macs for n in graph.nodes)
    quantized = sum(n.macs for n in graph.nodes if n.op_type in QUANTIZED_OPS or (n.macs and _fed_by_dequantize(graph, n)))
    arrays = [graph.initializer_array(name) for name in graph.initializers]
    sparse, dtypes = _weight_figures(arrays)
    return ModelInfo(
        name=str(path) if path else (model.graph.name or "model"),
        kind="onnx",
        nodes=len(graph.nodes),
        histogram=graph.histogram(),
        parameters=graph.parameters(),
        macs=macs,
        quantized_mac_share=quantized / macs if macs else 0.0,
        sparse_share=sparse,
        file_bytes=os.path.getsize(path) if path else model.ByteSize(),
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        inputs=[f"{name}: {_describe(graph, name)}" for name in graph.graph_inputs],
        outputs=[f"{name}: {_describe(graph, name)}" for name in graph.graph_outputs],
        weight_dtypes=dtypes,
        providers=_provider_truth(model) if check_providers else {},
        metadata={p.key: p.value for p in model.metadata_props},
    )


def _describe(graph: OnnxGraph, tensor: str) -> str:
    return type_text(graph.values[tensor]) if tensor in graph.values else "?"


def inspect_graph_module(graph_module: fx.GraphModule, name: str = "graph") -> ModelInfo:
    """Inspect a captured or compiled GraphModule."""
    snap = GraphSnapshot.of(graph_module, name)
    macs = snap.macs
    quantized = sum(n.macs for n in snap.nodes if n.precision and n.precision.startswith("int8"))
    arrays = [t.detach().cpu().numpy() for t in [*graph_module.parameters(), *graph_module.buffers()]
              if t.dtype != torch.bfloat16]
    sparse, dtypes = _weight_figures(arrays)
    return ModelInfo(
        name=name,
        kind="graph",
        nodes=len(snap.compute_nodes),
        histogram=snap.histogram(),
        parameters=snap.parameters,
        macs=macs,
        quantized_mac_share=quantized / macs if macs else 0.0,
        sparse_share=sparse,
        inputs=[f"{n.name}: {n.dtype}{list(n.shape or ())}" for n in snap.nodes if n.op == "placeholder"],
        weight_dtypes=dtypes,
    )
