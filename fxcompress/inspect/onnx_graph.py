"""A read-only view of an ONNX graph for inspection: nodes, producers, types, layers, MACs.

ONNX nodes refer to tensors by name; inspection wants node-level facts ("which node feeds this
one", "which layer is it", "how many multiply-accumulates"), so they are computed once here and
shared by :mod:`onnx_info` and :mod:`onnx_diff`.
"""

from __future__ import annotations

import ast
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fxcompress.errors import ModelFileError

#: Ops whose first input is quantized data (int8 kernels in ONNX Runtime).
QUANTIZED_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QAttention",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
#: (weight input index, contracted-dimension source) for ops with multiply-accumulates.
_MAC_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1, "Gemm": 0, "QGemm": 0,
            "MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "MatMulIntegerToFloat": 0,
            "DynamicQuantizeMatMul": 0, "FusedMatMul": 0}


@dataclass(frozen=True)
class OnnxNode:
    """One ONNX node as inspection sees it."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layer: str
    macs: int = 0
    out_type: str | None = None  # e.g. "float32[1, 8, 4, 4]" for the first output

    def describe(self) -> str:
        return f"{self.name} ({self.op_type})" + (f" {self.out_type}" if self.out_type else "")


def op_label(node: onnx.NodeProto) -> str:
    """``Conv`` for the default domain, ``com.microsoft.FusedConv`` otherwise."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _layer(node: onnx.NodeProto) -> str:
    """The module path a node came from: the torch exporter's name scopes, or a '/a/b/Op' name."""
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = [str(p) for p in ast.literal_eval(scopes)]
            # The first scope is the root module (''), the last the op itself.
            return ".".join(p for p in parts[1:-1] if p)
        except (ValueError, SyntaxError):
            pass
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return node.name.strip("/").rsplit("/", 1)[0].split("/")[-1]
    return ""


def _dims(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)


def type_text(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "?"
    dims = _dims(value)
    return f"{dtype}{list(dims)}" if dims is not None else dtype


def _known(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and all(d >= 0 for d in shape)


class OnnxGraph:
    """Nodes (topological order as stored), tensor types, initializers and producers of a model."""

    def __init__(self, model: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
        self.model = model
        self.path = Path(path) if path is not None else None
        graph = model.graph
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # noqa: BLE001 - inference fails on custom domains; types become unknown
            inferred = graph
        self.values = {v.name: v for v in [*inferred.input, *inferred.value_info, *inferred.output]}
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in graph.output]
        self.producer: dict[str, str] = {}
        self.nodes: list[OnnxNode] = []
        used: Counter = Counter()
        for index, proto in enumerate(graph.node):
            # Node names are optional in ONNX; unnamed nodes get a stable stand-in.
            name = proto.name or f"{proto.op_type}_{index}"
            used[name] += 1
            if used[name] > 1:
                name = f"{name}#{used[name] - 1}"
            for out in proto.output:
                if out:
                    self.producer[out] = name
            out_type = type_text(self.values[proto.output[0]]) if proto.output and proto.output[0] in self.values else None
            self.nodes.append(OnnxNode(name, op_label(proto), tuple(proto.input), tuple(proto.output),
                                       _layer(proto), self._macs(proto), out_type))
        self.protos = dict(zip((n.name for n in self.nodes), graph.node))

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        if tensor in self.initializers:
            return tuple(self.initializers[tensor].dims)
        return _dims(self.values[tensor]) if tensor in self.values else None

    def _macs(self, node: onnx.NodeProto) -> int:
        if node.op_type not in _MAC_OPS or not node.output:
            return 0
        out = self.shape(node.output[0])
        if not _known(out):
            return 0
        weight_index = _MAC_OPS[node.op_type]
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            weight = self.shape(node.input[weight_index]) if len(node.input) > weight_index else None
            # Per output element: (input channels / groups) x kernel area multiply-accumulates.
            return math.prod(out) * math.prod(weight[1:]) if _known(weight) else 0
        if node.op_type == "ConvTranspose":
            data, weight = self.shape(node.input[0]), self.shape(node.input[1])
            return math.prod(data) * math.prod(weight[1:]) if _known(data) and _known(weight) else 0
        first = self.shape(node.input[0])
        if not _known(first) or not first:
            return 0
        contracted = first[-1]
        if node.op_type in ("Gemm", "QGemm"):
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            contracted = first[0] if trans_a else first[-1]
        return math.prod(out) * contracted

    def producers_of(self, node: OnnxNode) -> tuple[str, ...]:
        """Names of the nodes (or graph inputs) feeding ``node``; weights appear as '<const>'."""
        out = []
        for tensor in node.inputs:
            if not tensor:
                continue
            if tensor in self.producer:
                out.append(self.producer[tensor])
            elif tensor in self.initializers:
                out.append("<const>")
            else:
                out.append(f"<input:{tensor}>")
        return tuple(out)

    def histogram(self) -> Counter:
        return Counter(n.op_type for n in self.nodes)

    def initializer_array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def parameters(self) -> int:
        """Elements stored in initializers and Constant nodes' tensors."""
        total = sum(math.prod(t.dims) for t in self.initializers.values())
        for proto in self.model.graph.node:
            if proto.op_type == "Constant":
                for a in proto.attribute:
                    if a.name == "value" and a.HasField("t"):
                        total += math.prod(a.t.dims)
        return total

    def layer_params(self) -> dict[str, int]:
        """Initializer elements per layer (each initializer counted once, for its first consumer)."""
        seen: set[str] = set()
        totals: Counter = Counter()
        for node in self.nodes:
            for tensor in node.inputs:
                if tensor in self.initializers and tensor not in seen:
                    seen.add(tensor)
                    totals[node.layer] += math.prod(self.initializers[tensor].dims)
        return dict(totals)


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """A ModelProto from a path (loaded with the checks of ``load_onnx``) or a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise ModelFileError(f"Cannot read an ONNX model from a {type(source).__name__}.",
                             "pass a path to an .onnx file or an onnx.ModelProto.")
    from fxcompress.export.onnx_export import load_onnx

    return load_onnx(source), Path(source)
