"""bfloat16 models in ONNX: weights stored as the model holds them, arithmetic in float32.

A model loaded in bfloat16 (as most checkpoints are published) is compiled in that dtype: nothing
upcasts its weights whole. Its exported graph, though, cannot compute in bfloat16 on ONNX
Runtime's CPU provider: no MatMul, Conv or Gemm kernel takes it, and the session refuses to load
(onnxruntime 1.31, checked here). So every bfloat16 *value* of the graph becomes float32 while every
bfloat16 *initializer* keeps its dtype and bytes, read through one ``Cast`` to float32 (which ORT's
optimizer constant-folds when a session opens, one tensor at a time, so a deployed session holds
float32 weights; with optimizations off each run casts). The file is the size of the model's own
weights, the rewrite touches no weight bytes (external data stays where it is), and the graph's
inputs and outputs are float32.

float16 is left alone: ORT's CPU provider runs float16 graphs (the ``fp16`` preset's files), so an
fp16 model's file keeps fp16 arithmetic; only the quantized ops (whose CPU kernels take float32)
cast their activations, in the passes' export faces.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxcompress.graph_meta import WEIGHTS_DTYPE_PROP

#: The element types rewritten to float32.
HALF_TYPES = (TensorProto.BFLOAT16,)
#: Suffix of an initializer's name once a Cast reads it (the Cast's output takes the old name).
STORED_SUFFIX = "_stored"


def _widen_type(type_proto: onnx.TypeProto) -> None:
    """Half element types in ``type_proto`` (tensors, sequences, optionals) become float32, in place."""
    which = type_proto.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(type_proto, which)
        if inner.elem_type in HALF_TYPES:
            inner.elem_type = TensorProto.FLOAT
    elif which == "sequence_type":
        _widen_type(type_proto.sequence_type.elem_type)
    elif which == "optional_type":
        _widen_type(type_proto.optional_type.elem_type)


def _widen_constant(tensor: onnx.TensorProto) -> None:
    """A small half tensor held in a node attribute becomes float32, in place."""
    if tensor.data_type in HALF_TYPES:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))


def _widen_graph(graph: onnx.GraphProto) -> int:
    """Rewrite ``graph`` (and its subgraphs) as described in the module docstring; the number of
    initializers now read through a Cast."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        _widen_type(value.type)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i in HALF_TYPES:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR:
                _widen_constant(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                for tensor in attr.tensors:
                    _widen_constant(tensor)
            elif attr.type == onnx.AttributeProto.TYPE_PROTO:
                _widen_type(attr.tp)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _widen_graph(sub)
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type in HALF_TYPES and not tensor.name.endswith(STORED_SUFFIX):  # not cast yet
            name = tensor.name
            tensor.name = name + STORED_SUFFIX
            casts.append(helper.make_node("Cast", [tensor.name], [name], name=f"{name}{STORED_SUFFIX}_cast",
                                          to=TensorProto.FLOAT))
    if casts:  # first, so the graph stays topologically sorted
        nodes = [*casts, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(casts)


def compute_in_float(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with its bfloat16 arithmetic in float32 and its bfloat16 initializers kept as
    stored, each read through a Cast (in place; also returned). The count is the number of casts;
    a model with bfloat16 weights is marked ``fxcompress_weights_dtype=bfloat16`` in its metadata."""
    count = _widen_graph(model.graph)
    if count:
        entry = model.metadata_props.add()
        entry.key, entry.value = WEIGHTS_DTYPE_PROP, "bfloat16"
    return model, count


__all__ = ["HALF_TYPES", "STORED_SUFFIX", "WEIGHTS_DTYPE_PROP", "compute_in_float"]
