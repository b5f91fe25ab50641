"""GraphModule -> ONNX through ``torch.onnx.export(..., dynamo=True)`` (docs/design.md, decision 2).

The exported model is checked (``onnx.checker`` full check, strict shape inference), optionally
simplified with onnxsim (kept only when it still checks), stamped with metadata, and written
atomically.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx
import onnx_ir
import torch
from torch import fx

from fxcompress.capture import dynamic_shapes, holding_tracing_lock
from fxcompress.errors import ExportError, ModelFileError
from fxcompress.export.atomic import write_atomically
from fxcompress.export.external import EXTERNAL_BYTES, PROTOBUF_LIMIT, is_external, load_inline
from fxcompress.export.half import compute_in_float
from fxcompress.export.int8_weights import store_int8_weights
from fxcompress.export.nbits import lower_nbits
from fxcompress.files import check_model_file
from fxcompress.graph_meta import layer_name


@holding_tracing_lock
def export_model_proto(
    graph_module: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = False,
    simplify: bool = False,
    dynamic_sequence: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    shapes: Sequence[Any] | None = None,
    dim_names: Mapping[tuple[str, int], str] | None = None,
    opset: int | None = None,
    external_data: Path | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Export to an in-memory, checked ModelProto.

    ``external_data``: a file (in a folder of its own) the weights are written to as they leave
    the exporter, the ModelProto keeping only the graph and references into that file
    (fxcompress.export.external): the weights are never held a second time in memory. Without it
    they are inside the ModelProto.

    ``input_names`` / ``output_names`` name the graph's inputs and outputs (a model called with
    keyword inputs: ``input_ids``, ``attention_mask``; its output fields: ``last_hidden_state``).
    ``shapes`` is an explicit torch.export dynamic-shapes spec, one entry per input, used instead of
    ``dynamic_batch`` / ``dynamic_sequence``; ``dim_names`` renames the symbolic dimension
    ``(graph input or output name, axis)`` that torch left unnamed (e.g. ``s53``). ``opset``: the
    ONNX opset (None: the exporter's default, 18); 23 exports attention as one ``Attention`` node
    and rotary embeddings as ``RotaryEmbedding`` (what decoders use: benchmarks/results/decoder.md).

    Returns the model and notes (``simplified``: whether onnxsim's result was kept, node counts).
    Raises ExportError with the exporter's first line and a hint when export fails.
    """
    # Export in eval mode, then give the caller back the module in the mode it was in (users
    # fine-tune result.module and export between epochs).
    modes = {name: m.training for name, m in graph_module.named_modules()}
    graph_module.eval()
    notes: dict[str, Any] = {}
    exported_module = pin_attention_layout(graph_module)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                exported_module,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                verbose=False,
                external_data=False,
                dynamic_shapes=list(shapes) if shapes is not None else
                dynamic_shapes(tuple(example_inputs), dynamic_batch, dynamic_sequence),
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise _export_failure(exc, graph_module) from None
    finally:
        for name, m in graph_module.named_modules():
            m.training = modes.get(name, m.training)
    if external_data is not None:  # tensor by tensor, straight from the torch tensors the graph shares
        onnx_ir.external_data.unload_from_model(program.model, external_data.parent, external_data.name,
                                                size_threshold_bytes=EXTERNAL_BYTES)
    model = onnx_ir.serde.serialize_model(program.model)
    del program
    base_dir = None if external_data is None else external_data.parent
    if dim_names:
        _rename_dims(model, dim_names)
    if dynamic_batch and model.graph.input and not model.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        raise ExportError(
            "The graph has its batch size baked in, so the ONNX batch axis cannot be dynamic.",
            "compile with options=fxcompress.CompileOptions(dynamic_batch=True) (the graph is then captured with a symbolic batch) and an example batch of at least 2.",
        )
    # Quantized weights go into the file as int8 (a quarter of the bytes), not as fp32 + QuantizeLinear.
    model, notes["int8_weights"] = store_int8_weights(model, base_dir)
    # Block-quantized weights (quantize-weights) become ORT's MatMulNBits / GatherBlockQuantized, packed.
    model, notes["nbits_weights"] = lower_nbits(model, base_dir)
    # bfloat16 weights stay bfloat16 in the file; the arithmetic is float32 (no ORT CPU kernel takes bf16)
    model, notes["bfloat16_weights"] = compute_in_float(model)
    check_model(model)
    notes["nodes_exported"] = len(model.graph.node)
    if simplify:
        if base_dir is not None:  # onnxsim reads the weights from the ModelProto
            load_inline(model, base_dir)
        model, notes["simplified"] = _simplify(model)
    notes["nodes"] = len(model.graph.node)
    return model, notes


def pin_attention_layout(graph_module: fx.GraphModule) -> fx.GraphModule:
    """``graph_module``, or a copy sharing its weights where every ``scaled_dot_product_attention``
    output goes through a contiguous ``clone`` first.

    torch.onnx's decomposition sees a strided layout for sdpa's output (heads-last) and turns the
    ``transpose(1, 2).reshape(...)`` after it into a ``view``; its type-promotion step then
    re-runs the graph with sdpa's contiguous fake result, and that view fails ("Cannot view a
    tensor with shape ... and strides ..."): T5 and other models whose attention reshapes after a
    transpose do not export. A contiguous copy gives both steps the same layout; ONNX drops it
    (Identity) and the compiled module itself is left as it is.
    """
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    if not any(n.target is sdpa for n in graph_module.graph.nodes):
        return graph_module
    pinned = fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph), class_name="GraphModule")
    graph = pinned.graph
    for node in [n for n in graph.nodes if n.target is sdpa]:
        with graph.inserting_after(node):
            clone = graph.call_function(torch.ops.aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
        node.replace_all_uses_with(clone, delete_user_cb=lambda user: user is not clone)
        clone.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    pinned.recompile()
    return pinned


def _rename_dims(model: onnx.ModelProto, dim_names: Mapping[tuple[str, int], str]) -> None:
    """Rename the symbolic dims ``dim_names`` names, everywhere the graph's value infos use them."""
    renames: dict[str, str] = {}
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            wanted = dim_names.get((value.name, axis))
            if wanted and dim.dim_param and dim.dim_param != wanted:
                renames[dim.dim_param] = wanted
    if not renames:
        return
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                # torch names derived sizes by expression ("s53 + 1"): rename whole tokens only
                dim.dim_param = re.sub(r"\b\w+\b", lambda m: renames.get(m.group(0), m.group(0)), dim.dim_param)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _export_failure(exc: Exception, graph_module: fx.GraphModule) -> ExportError:
    """An ExportError naming the graph node and op the exporter could not translate, and its root cause."""
    text = _ANSI.sub("", str(exc))
    node_line = re.search(r"Error when translating node %(\w+) .*?target=([\w.]+)", text)
    cause = re.search(r"Exception summary\s*<class '[^']+'>: (.+)", text)
    if node_line:
        name, target = node_line.groups()
        node = next((n for n in graph_module.graph.nodes if n.name == name), None)
        layer = layer_name(node, fallback="") if node is not None else ""
        where = f"node '{name}'" + (f" in layer '{layer}'" if layer else "")
        reason = f": {cause.group(1).strip().rstrip('.')}" if cause else ""
        return ExportError(
            f"torch.onnx.export cannot translate {target} ({where}){reason}. The compiled graph keeps the op "
            "as it is; only the ONNX export fails.",
            "replace that operation in the model (or move it to pre/post-processing), or use the compiled "
            "module from PyTorch instead of exporting it.",
        )
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return ExportError(
        f"torch.onnx.export failed: {type(exc).__name__}: {first}",
        "an op in the graph may have no ONNX translation: run `fxcompress inspect` on the compiled "
        "module to find it, or drop the pass that introduced it from the recipe.",
    )


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """onnxsim's result when it succeeds and still checks; otherwise the input unchanged."""
    import onnxsim

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            simplified, ok = onnxsim.simplify(model)
        if ok:
            check_model(simplified)
            return simplified, True
    except Exception:  # noqa: BLE001 - simplification is optional; the exported model stands
        pass
    return model, False


def check_model(model: onnx.ModelProto) -> None:
    """Full onnx.checker check plus strict shape inference; ExportError on failure.

    Both run on :func:`weightless` ``model``: the checker and shape inference serialize what they
    are given and shape inference returns a whole new model, which with the weights inside held
    them three more times at once.
    """
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise ExportError("The model is over 2 GiB, the protobuf limit for one ONNX model held in memory.",
                          "write it with export_onnx (a file over the limit gets its weights in a .onnx.data file "
                          "beside it), or compress it further (int8, pruning).")
    skeleton = weightless(model)
    try:
        onnx.checker.check_model(skeleton, full_check=True)
        onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"The exported ONNX model does not pass onnx.checker: {exc}",
                          "report this model; export without onnxsim (simplify=False) to narrow it down.") from None


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``graph`` (or of a subgraph inside it) reads."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
    return names


def drop_unused_inputs(model: onnx.ModelProto) -> list[str]:
    """Remove graph inputs that no node reads and no output is (an argument forward() never
    uses stays a required ONNX input otherwise); returns their names. ``model`` is changed in place."""
    graph = model.graph
    read = _names_read(graph) | {o.name for o in graph.output}
    dropped = [value.name for value in graph.input if value.name not in read]
    if dropped:
        kept = [value for value in graph.input if value.name in read]
        del graph.input[:]
        graph.input.extend(kept)
    return dropped
#: Initializers at least this large become typed graph inputs in :func:`weightless` (smaller ones,
#: shape constants among them, stay: shape inference reads their values).
_WEIGHTLESS_BYTES = 64 * 1024


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the bytes of its large initializers: each becomes a graph input
    of the same name, type and shape, which is all the checker and shape inference look at."""
    graph = model.graph
    skeleton = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            skeleton.MergeFrom(onnx.ModelProto(**{descriptor.name: value}))
    for descriptor, value in graph.ListFields():
        if descriptor.name != "initializer":
            skeleton.graph.MergeFrom(onnx.GraphProto(**{descriptor.name: value}))
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if (tensor.ByteSize() < _WEIGHTLESS_BYTES and not is_external(tensor)) or tensor.name in inputs:
            skeleton.graph.initializer.append(tensor)
        else:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> None:
    """Set (replace) string metadata props on ``model``."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key = key
        prop.value = str(value)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (no partial file on failure)."""
    return write_atomically(path, lambda tmp: onnx.save_model(model, str(tmp)))


def load_onnx(path: str | os.PathLike, *, max_bytes: int | None = None) -> onnx.ModelProto:
    """Load and check an ONNX file; clear errors for missing, oversized, corrupt or unsafe files.

    ``max_bytes``: the size limit (default fxcompress.files.MAX_MODEL_FILE_BYTES, as for every model file).
    External data must live inside the model's folder: a location with ``..`` or an absolute
    path would make us read arbitrary files, so it is refused.
    """
    path = check_model_file(path, "ONNX file", max_bytes=max_bytes)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]}).",
                             "the file is corrupt or truncated, or not ONNX: export it again.") from None
    _check_external_data(model, path.parent)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph)):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # noqa: BLE001 - short/unreadable .data files, onnx's own path checks
            raise ModelFileError(f"The external data of {path} could not be read ({type(exc).__name__}: {str(exc)[:160]}).",
                                 "copy the complete .data file(s) next to the .onnx file, or export again.") from None
    # A graph without nodes is valid when its outputs are constants (a model whose head is all
    # zeros folds to one); a graph without outputs computes nothing and is what truncation leaves.
    if not model.graph.output:
        raise ModelFileError(f"{path} parses but its graph has no outputs.", "the file is corrupt or truncated: export it again.")
    return model


def _all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of ``graph``: initializers, sparse initializers and node attributes
    (Constant values), recursing into subgraphs (If/Loop/Scan bodies). Any of them may point at
    external data, and onnx.load_external_data_for_model reads them all."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    base = base.resolve()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelFileError(
                f"Tensor '{tensor.name}' points its external data at {location!r}, outside the model's folder.",
                "refusing to read it (path traversal); re-export the model with its data beside it.",
            )
        if not target.is_file():
            raise ModelFileError(f"External data file {location!r} for '{tensor.name}' is missing.",
                                 "copy the .data file next to the .onnx file.")
