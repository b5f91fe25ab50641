"""Store quantized weights as int8 in the ONNX file.

The quantization passes put ``fake_quantize`` on every weight, which the exporter writes as
``float weight -> QuantizeLinear -> DequantizeLinear``: the file keeps the fp32 weight and ORT
quantizes it again each time a session is created. Here every QuantizeLinear whose input, scale
and zero point are all initializers is evaluated once (ONNX semantics: round half to even, then
saturate to the zero point's type) and replaced by its int8/uint8 result, which is what ORT's own
quantizer stores. The outputs are bit-identical; the weights take a quarter of the bytes.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from fxcompress.export.external import to_array


def _constant(values: dict[str, onnx.TensorProto], name: str, base_dir: str | os.PathLike | None) -> np.ndarray | None:
    tensor = values.get(name)
    return None if tensor is None else to_array(tensor, base_dir)


def _quantize(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear on a constant: per-tensor, or per-channel along ``axis``."""
    if scale.ndim == 1 and scale.size > 1:  # per channel: broadcast along ``axis``
        shape = [1] * weight.ndim
        shape[axis] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    quantized = np.rint(weight.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.int32)
    return np.clip(quantized, info.min, info.max).astype(zero_point.dtype)


def store_int8_weights(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, int]:
    """Replace QuantizeLinear of constant weights by the quantized constant, in place.

    ``base_dir``: the folder external initializers are read from (fxcompress.export.external).

    Returns the model and how many weights were stored quantized. Float initializers left without
    a reader are dropped. QuantizeLinear with a ``block_size`` or non-integer output type, and any
    weight that a graph input overrides, are left alone.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    values = {t.name: t for t in graph.initializer if t.name not in inputs}
    kept: list[onnx.NodeProto] = []
    stored = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        arrays = [_constant(values, name, base_dir) for name in node.input] if node.op_type == "QuantizeLinear" else []
        if (node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(arrays) != 3
                or any(a is None for a in arrays) or attrs.get("block_size", 0)
                or arrays[2].dtype not in (np.int8, np.uint8)):
            kept.append(node)
            continue
        weight, scale, zero_point = arrays
        axis = int(attrs.get("axis", 1)) % max(weight.ndim, 1)
        quantized = numpy_helper.from_array(_quantize(weight, scale, zero_point, axis), node.output[0])
        graph.initializer.append(quantized)
        values[node.output[0]] = quantized
        stored += 1
    if stored:
        del graph.node[:]
        graph.node.extend(kept)
        drop_unread_initializers(graph)
    return model, stored


def drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node (nor subgraph) reads and no output names: the float
    weights a lowering replaced."""
    read = _names_read(graph) | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _names_read(sub)
    return names
