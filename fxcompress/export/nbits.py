"""Lower block-quantized weights to ONNX Runtime's ``MatMulNBits`` and ``GatherBlockQuantized``.

``quantize-weights`` exports each quantized layer as one marker node of the ``fxcompress`` domain
reading the float weight, its per-block scales and zero points (see
:mod:`fxcompress.passes.quantize_weights`). Here each marker becomes the ``com.microsoft`` op ORT
runs, with the weight stored packed:

* ``BlockQuantizedMatMul(A, W, scale, zero_point, bias)`` -> ``MatMulNBits(A, B, scales,
  zero_points, , bias)``: ``B [N, n_blocks, block_size * bits / 8]`` uint8, each block's codes
  packed along K (4 bits: the even element in the low nibble); ``scales [N, n_blocks]``;
  zero points packed the same way, one row per output, left out when every one is MatMulNBits'
  default ``2**(bits-1)`` (symmetric blocks); attributes ``K, N, bits, block_size, accuracy_level``.
* ``BlockQuantizedGather(W, ids, scale, zero_point)`` -> ``GatherBlockQuantized(data, ids,
  scales, zero_points)`` with ``gather_axis=0, quantize_axis=1``: ``data [V, n_blocks * block_size
  * bits / 8]``, the rows of B laid end to end, so a table tied to the output projection is one
  initializer: the gather reads B through a Reshape (constant, folded by ORT when the session is
  made), and scales and zero points are literally the same tensors. When D is not a multiple of
  the block size the gathered rows are sliced back to D.

Codes come from :func:`fxcompress.passes.block_quant.block_codes`, the function the PyTorch
face rounds with, so the file holds exactly the module's weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from fxcompress.export.external import to_array
from fxcompress.export.int8_weights import drop_unread_initializers
from fxcompress.passes.block_quant import block_codes
from fxcompress.passes.quantize_weights import GATHER_OP, LINEAR_OP, ONNX_DOMAIN

MS_DOMAIN = "com.microsoft"


@dataclass
class _Packed:
    """Initializer names of one packed weight (shared by every node that reads the same tensors)."""

    data: str            # [N, n_blocks, blob] uint8, or [N, n_blocks * blob] if no MatMulNBits reads it
    scales: str
    zero_points: str     # "" when symmetric (ORT's default zero point)
    rows: int
    cols: int
    n_blocks: int
    three_d: bool


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``[..., n]`` (n * bits a multiple of 8) packed into bytes along the last axis,
    the lower-indexed value in the lower bits."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed


def _pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """Zero points ``[N, n_blocks]`` packed per row (``[N, ceil(n_blocks * bits / 8)]``), padded with 0."""
    per_byte = 8 // bits
    pad = -zero.shape[1] % per_byte
    if pad:
        zero = np.concatenate([zero, np.zeros((zero.shape[0], pad), dtype=zero.dtype)], axis=1)
    return pack_codes(zero, bits)


def lower_nbits(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, int]:
    """Replace every ``fxcompress`` block-quantized marker node by its ORT op, in place.

    ``base_dir``: the folder external initializers are read from (fxcompress.export.external).

    Returns the model and how many nodes were lowered. Float weights nothing reads any more are
    dropped from the initializers.
    """
    graph = model.graph
    markers = [n for n in graph.node if n.domain == ONNX_DOMAIN and n.op_type in (LINEAR_OP, GATHER_OP)]
    if not markers:
        return model, 0
    values = {t.name: t for t in graph.initializer}
    # A tensor read by a MatMulNBits is stored in its [N, n_blocks, blob] form; gathers reshape it.
    matmul_weights = {n.input[1] for n in markers if n.op_type == LINEAR_OP}
    packed: dict[tuple[str, str, str], _Packed] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node not in markers:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block_size = int(attrs["bits"]), int(attrs["block_size"])
        weight_name = node.input[0] if node.op_type == GATHER_OP else node.input[1]
        scale_name, zero_name = node.input[2], node.input[3]
        key = (weight_name, scale_name, zero_name)
        if key not in packed:
            packed[key] = _pack(graph, values, key, bits, block_size, weight_name in matmul_weights, base_dir)
        p = packed[key]
        if node.op_type == LINEAR_OP:
            bias = node.input[4] if len(node.input) > 4 else ""
            inputs = [node.input[0], p.data, p.scales, p.zero_points, "", bias]
            while inputs[-1] == "":
                inputs.pop()
            nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
                                          K=p.cols, N=p.rows, bits=bits, block_size=block_size,
                                          accuracy_level=int(attrs.get("accuracy_level", 0))))
        else:
            nodes.extend(_gather(graph, node, p, bits, block_size))
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unread_initializers(graph)
    _set_opsets(model)
    return model, len(markers)


def _pack(graph: onnx.GraphProto, values: dict[str, onnx.TensorProto], key: tuple[str, str, str], bits: int,
          block_size: int, three_d: bool, base_dir: str | os.PathLike | None) -> _Packed:
    weight_name, scale_name, zero_name = key
    try:
        weight, scale, zero = (to_array(values[name], base_dir) for name in key)
    except KeyError as missing:
        raise ValueError(f"block-quantized weight input {missing} is not a constant initializer") from None
    rows, cols = weight.shape
    # one weight at a time in float32 (a bf16 / fp16 model's weight is read as stored)
    codes = block_codes(torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(scale.copy()), torch.from_numpy(zero.copy()),
                        bits, block_size).to(torch.uint8).numpy()
    n_blocks = codes.shape[1]
    data = pack_codes(codes, bits)  # [N, n_blocks, blob]
    base = weight_name.replace("/", "_")
    data_name = f"{base}_q{bits}"
    if not three_d:
        data = data.reshape(rows, -1)
    graph.initializer.append(numpy_helper.from_array(data, data_name))
    scales_name = f"{base}_q{bits}_scales"
    graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32).reshape(rows, n_blocks), scales_name))
    zeros_name = ""
    if not np.all(zero == 2 ** (bits - 1)):
        zeros_name = f"{base}_q{bits}_zero_points"
        graph.initializer.append(numpy_helper.from_array(_pack_zero_points(zero.reshape(rows, n_blocks), bits), zeros_name))
    return _Packed(data_name, scales_name, zeros_name, rows, cols, n_blocks, three_d)


def _gather(graph: onnx.GraphProto, node: onnx.NodeProto, p: _Packed, bits: int, block_size: int) -> list[onnx.NodeProto]:
    """GatherBlockQuantized for ``node`` (plus the Reshape of a shared B and the Slice of padding)."""
    out: list[onnx.NodeProto] = []
    data = p.data
    if p.three_d:  # the table is also a MatMulNBits' B: read its rows end to end
        shape = f"{node.name}_data_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([p.rows, -1], dtype=np.int64), shape))
        data = f"{node.name}_data"
        out.append(helper.make_node("Reshape", [p.data, shape], [data], name=f"{node.name}_reshape"))
    padded = p.n_blocks * block_size != p.cols
    result = f"{node.name}_padded" if padded else node.output[0]
    inputs = [data, node.input[1], p.scales] + ([p.zero_points] if p.zero_points else [])
    out.append(helper.make_node("GatherBlockQuantized", inputs, [result], name=node.name, domain=MS_DOMAIN,
                                gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits))
    if padded:
        bounds = [f"{node.name}_slice_{what}" for what in ("starts", "ends", "axes")]
        for name, value in zip(bounds, ([0], [p.cols], [-1])):
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
        out.append(helper.make_node("Slice", [result, *bounds], [node.output[0]], name=f"{node.name}_slice"))
    return out


def _set_opsets(model: onnx.ModelProto) -> None:
    """Import com.microsoft (version 1) instead of the marker domain."""
    kept = [o for o in model.opset_import if o.domain not in (ONNX_DOMAIN, MS_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


__all__ = ["lower_nbits", "pack_codes"]
