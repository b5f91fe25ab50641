"""Dynamic int8 quantization of linear layers (transformer encoders): int8 weights, activations
quantized at run time from their own min/max. Embedding tables are stored as int8 too
(:func:`int8_embedding`).

Each ``aten.linear`` (and matmul by a constant weight) becomes a call to
:func:`dynamic_int8_linear`, which has two faces:

* in PyTorch (eager, training, calibration-free): the input is fake-quantized to uint8 with a scale
  and zero point computed from the tensor itself (ONNX ``DynamicQuantizeLinear`` semantics:
  range ``[min(x, 0), max(x, 0)]``, round half to even), the weight is fake-quantized per output
  channel to symmetric int8; both have straight-through gradients, so the module stays trainable.
* under ``torch.onnx.export`` it emits ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
  (x_scale * w_scale) -> Add(bias)`` with the weight stored as an int8 initializer: the pattern
  ONNX Runtime fuses into one ``DynamicQuantizeMatMul`` kernel (what ``quantize_dynamic`` makes).

Both faces compute the same integers, so the export's parity against the module is at fp32
rounding level.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.analysis.macs import register_linear_like
from fxcompress.analysis.graph_keys import node_keys, nodes_by_key
from fxcompress.analysis.sensitivity import MetricTrial, layer_sensitivities, report_trial, select_float_layers_by_metric
from fxcompress.rewrite.matchers import attribute, tensor_val
from fxcompress.capture import register_leaf_function
from fxcompress.infra.context import UserMetric
from fxcompress.infra.pass_base import DataDrivenPass, PassResult, option
from fxcompress.infra.registry import register
from fxcompress.errors import RecipeError
from fxcompress.passes.calibrators import (FLOAT_WEIGHTS, WEIGHT_RANGE_HELP, WEIGHT_RANGES, symmetric_weight_scales, watch_values,
                                          weight_levels)
from fxcompress.graph_meta import QUANT_META, inherit_meta, layer_name, matches_layer

aten = torch.ops.aten


def _dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point of ONNX DynamicQuantizeLinear, computed from ``x`` (float32)."""
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale.float(), zero_point.to(torch.int32)


@register_leaf_function
def dynamic_int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` with ``x`` dynamically quantized to uint8 and ``weight`` to int8 per row."""
    if torch.onnx.is_in_onnx_export():
        return _export_face(x, weight, weight_scale, bias)
    # ORT's integer kernels take float32 activations: a bf16 / fp16 model's layer computes in float32
    # (this one weight upcast for the call, never the model) and returns its own dtype
    dtype = x.dtype
    x, weight = x.float(), weight.float()
    bias = None if bias is None else bias.float()
    zero = torch.zeros(weight_scale.shape, dtype=torch.int32, device=weight.device)
    if weight_scale.dim() == 0:  # one scale for the whole weight (rows of equal range, see equalize-attention)
        w = torch.fake_quantize_per_tensor_affine(weight, weight_scale, zero, -128, 127)
    else:
        w = torch.fake_quantize_per_channel_affine(weight, weight_scale, zero, 0, -128, 127)
    scale, zero_point = _dynamic_qparams(x)
    xq = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
    return torch.nn.functional.linear(xq, w, bias).to(dtype)


def _export_face(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # QuantizeLinear (not round/clip arithmetic) so that export.int8_weights can evaluate it once
    # and store the weight as int8: the file shrinks 4x, as with ORT's quantize_dynamic.
    zero = torch.zeros(weight_scale.shape, dtype=torch.int8)
    per_tensor = weight_scale.dim() == 0
    wq = torch.onnx.ops.symbolic("QuantizeLinear", (weight, weight_scale, zero), {} if per_tensor else {"axis": 0},
                                 dtype=torch.int8, shape=weight.shape, version=13).t()
    dtype = x.dtype
    x = x.float()  # DynamicQuantizeLinear takes float32 only
    bias = None if bias is None else bias.float()
    xq, x_scale, x_zero = torch.onnx.ops.symbolic_multi_out(
        "DynamicQuantizeLinear", (x,), {}, dtypes=(torch.uint8, torch.float32, torch.uint8),
        shapes=(x.shape, (), ()), version=11)
    out_shape = (*x.shape[:-1], weight.shape[0])
    acc = torch.onnx.ops.symbolic("MatMulInteger", (xq, wq, x_zero), {}, dtype=torch.int32, shape=out_shape, version=10)
    # ORT fuses this into DynamicQuantizeMatMul / MatMulIntegerToFloat, whose CPU kernel runs about
    # 1.5x slower with a per-column weight scale than with one scale for the whole weight (all-MiniLM-L6-v2,
    # 32x32 tokens, 1 thread: 681 ms against 439 ms with scalar scales, docs/fidelity.md). So the fused
    # op gets the largest column scale and the columns' ratios to it (<= 1) follow as one Mul; the bias,
    # divided by those ratios, stays inside the fused op. Same products as acc * x_scale * w_scale + bias
    # up to fp32 rounding. A weight with one scale (a 0-d weight_scale) needs no Mul.
    if per_tensor:
        y = acc.to(torch.float32) * (x_scale * weight_scale)
        return y if bias is None else y + bias
    top = weight_scale.max()
    ratio = weight_scale / top
    y = acc.to(torch.float32) * (x_scale * top)
    if bias is not None:
        y = y + bias / ratio
    return (y * ratio).to(dtype)


register_linear_like(dynamic_int8_linear)


@register_leaf_function
def int8_embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, padding_idx: int = -1) -> torch.Tensor:
    """``embedding(ids, weight)`` with the table quantized to int8 (one symmetric scale for the table).

    In PyTorch the table is fake-quantized (straight-through gradient, so it still trains;
    ``padding_idx`` keeps its row's gradient at zero as in ``nn.Embedding``). Under
    ``torch.onnx.export`` the table is stored as int8 (QuantizeLinear, evaluated once by
    export.int8_weights), the lookup gathers int8 rows and only those are dequantized: what ORT's
    ``quantize_dynamic`` does with an embedding, and a quarter of the bytes of a float table.
    """
    if torch.onnx.is_in_onnx_export():
        zero8 = torch.zeros((), dtype=torch.int8)
        table = torch.onnx.ops.symbolic("QuantizeLinear", (weight, scale, zero8), {}, dtype=torch.int8,
                                        shape=weight.shape, version=13)
        rows = torch.onnx.ops.symbolic("Gather", (table, ids), {"axis": 0}, dtype=torch.int8,
                                       shape=(*ids.shape, weight.shape[1]), version=13)
        return torch.onnx.ops.symbolic("DequantizeLinear", (rows, scale, zero8), {}, dtype=torch.float32,
                                       shape=(*ids.shape, weight.shape[1]), version=13).to(weight.dtype)
    zero = torch.zeros((), dtype=torch.int32, device=weight.device)
    table = torch.fake_quantize_per_tensor_affine(weight.float(), scale, zero, -128, 127)
    rows = torch.nn.functional.embedding(ids, table, padding_idx=None if padding_idx < 0 else padding_idx)
    return rows.to(weight.dtype)


#: Row scales within this relative spread quantize every weight to the same integers with their largest
#: (equalize-attention leaves the rows it balanced equal up to fp32 rounding).
_UNIFORM = 1e-6


def _uniform(scale: torch.Tensor) -> bool:
    """Whether per-row weight scales are all equal up to rounding (one scale then gives the same integers)."""
    return scale.numel() > 1 and float(scale.max() - scale.min()) <= _UNIFORM * float(scale.max())


def _linear_weight(node: fx.Node) -> tuple[fx.Node, fx.Node | None, bool] | None:
    """(weight, bias, transposed) of a linear or matmul-by-constant node, else None."""
    if node.target is aten.linear.default:
        w = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(w, fx.Node) and w.op == "get_attr" and (bias is None or isinstance(bias, fx.Node)):
            return w, bias, False
    if node.target in (aten.matmul.default, aten.mm.default):
        w = node.args[1]
        val = w.meta.get("val") if isinstance(w, fx.Node) else None
        if isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(val, torch.Tensor) and val.dim() == 2:
            return w, None, True
    return None


@dataclass(frozen=True)
class QuantizeInt8DynamicOptions:
    skip: tuple[str, ...] = option((), "layers kept in float: module paths or fnmatch patterns ('classifier', 'encoder.layer.0.*')")
    min_features: int = option(16, "leave linear layers with fewer input features than this in float (too small to gain)")
    embeddings: bool = option(True, "also store embedding tables as int8 (one scale per table; rows dequantized after the lookup)")
    weight_range: str = option("auto", WEIGHT_RANGE_HELP)
    per_tensor_within: float = option(
        0.0, "give a layer one weight scale (no per-column Mul after ORT's fused kernel, which is faster) when its "
             "output error on the example inputs grows by at most this fraction over per-row scales (0: never)")

    def __post_init__(self) -> None:
        if not self.per_tensor_within >= 0:
            raise RecipeError(f"quantize-int8-dynamic: per_tensor_within must be >= 0, got {self.per_tensor_within}.",
                              "use 0 (per-row scales everywhere) or e.g. 0.1 (10% more error allowed for one scale).")
        if self.weight_range not in WEIGHT_RANGES:
            raise RecipeError(f"quantize-int8-dynamic: unknown weight_range {self.weight_range!r}.",
                              f"use one of {', '.join(WEIGHT_RANGES)}.")



@register
class QuantizeInt8DynamicPass(DataDrivenPass):
    """Dynamic int8 for linear layers: int8 per-channel weights, activations quantized at run time;
    embedding tables stored as int8 (option ``embeddings``).

    Needs no calibration data. Exports as DynamicQuantizeLinear + MatMulInteger, which ORT fuses
    into DynamicQuantizeMatMul.
    """

    name = "quantize-int8-dynamic"
    runs_on = "float"
    Options = QuantizeInt8DynamicOptions
    lossless = False
    exports_exactly = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        metric = self.context.metric if self.context is not None else None
        kept_float: set[str] = set()
        trials: list[MetricTrial] = []
        if metric is not None and metric.max_drop is not None:
            kept_float, trials = self._metric_search(graph_module, metric)
        graph_module, layers = self._rewrite(graph_module, kept_float)
        quantized = sum(1 for layer in layers if layer["precision"] != "float")
        stats: dict[str, Any] = {"quantized_layers": quantized, "layers": layers}
        if trials:
            stats["metric_trials"] = [vars(t) for t in trials]
        return PassResult(graph_module, quantized > 0, stats)

    def _metric_search(self, graph_module: fx.GraphModule, metric: UserMetric) -> tuple[set[str], list[MetricTrial]]:
        """Accuracy-aware compile: the nodes to keep in float so the user's metric drops at most its budget.

        Layers are ranked by their drift on the example inputs when quantized alone (no
        calibration data exists for a dynamic pass), then the user's metric decides how many of
        the most sensitive ones stay in float (:func:`select_float_layers_by_metric`).
        """
        reference = copy.deepcopy(graph_module)
        reference._tracer_cls = graph_module._tracer_cls  # what unpickling re-traces with (deepcopy drops it)
        _, layers = self._rewrite(copy.deepcopy(reference), set())
        nodes = [layer["node"] for layer in layers if layer["precision"] != "float"]

        build = _DynamicBuilder(type(self)(self.options), reference, nodes)
        batches = [tuple(t.clone() for t in self.context.example_inputs)]
        sensitivity = layer_sensitivities(reference, build, range(len(nodes)), batches)
        ranked = sorted(range(len(nodes)), key=lambda i: sensitivity[i], reverse=True)
        kept, trials = select_float_layers_by_metric(build, ranked, metric.drop_of, metric.max_drop,
                                                     on_trial=report_trial if self.context.progress else lambda t: None)
        return {nodes[i] for i in kept}, trials

    def _rewrite(self, graph_module: fx.GraphModule, kept_float: set[str]) -> tuple[fx.GraphModule, list[dict]]:
        """Quantize every eligible layer except the nodes named in ``kept_float``; the layer report."""
        graph = graph_module.graph
        layers = []
        levels = weight_levels(self.options.weight_range)
        error_growth = self._per_tensor_error_growth(graph_module, levels)
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.embedding.default and self.options.embeddings:
                layers += self._embedding(graph_module, node, len(layers), kept_float)
                continue
            found = _linear_weight(node)
            if found is None:
                continue
            weight_node, bias, transposed = found
            name = layer_name(node)
            weight = attribute(graph_module, weight_node.target).detach()
            in_features = weight.shape[0] if transposed else weight.shape[1]
            x = node.args[0]
            val = x.meta.get("val") if isinstance(x, fx.Node) else None
            if not (isinstance(val, torch.Tensor) and val.dtype in FLOAT_WEIGHTS and val.dtype == weight.dtype):
                continue  # a bf16 / fp16 model quantizes from its own dtype; mixed dtypes (fp16 preset) stay
            if node.name in kept_float:
                layers.append({"name": name, "node": node.name, "kind": "linear", "precision": "float", "reason": "max_metric_drop"})
                continue
            if self._skipped(name, node) or in_features < self.options.min_features:
                layers.append({"name": name, "node": node.name, "kind": "linear", "precision": "float", "reason": "skip"})
                continue
            index = len(layers)
            prefix = f"_fxqd{index}_{name.replace('.', '_')}"
            with graph.inserting_before(node):
                w = weight_node
                if transposed:  # x @ W  ==  linear(x, W.T)
                    w = graph.call_function(aten.t.default, (weight_node,))
                    w.meta["val"] = weight_node.meta["val"].t()
                scale = symmetric_weight_scales(weight.t() if transposed else weight, 0, levels)
                growth = error_growth.get(node.name)
                per_tensor = _uniform(scale) or (growth is not None and growth <= 1 + self.options.per_tensor_within)
                if per_tensor:  # same integers with one scale, and the export needs no per-column Mul
                    scale = scale.max().reshape(())
                graph_module.register_buffer(f"{prefix}_scale", scale)
                s = graph.get_attr(f"{prefix}_scale")
                s.meta["val"] = scale
                s.meta[QUANT_META] = {"role": "weight-param", "layer": name}
                q = graph.call_function(dynamic_int8_linear, (x, w, s, bias))
            inherit_meta(q, node)
            q.meta[QUANT_META] = {"role": "dynamic-linear", "layer": name}
            layers.append({"name": name, "node": node.name, "kind": "linear", "precision": "int8-dynamic",
                           "weight_levels": levels, "weight_scale": "per-tensor" if per_tensor else "per-channel",
                           **({"per_tensor_error_growth": round(growth, 3)} if growth is not None else {})})
            node.replace_all_uses_with(q)
            graph.erase_node(node)
        if any(layer["precision"] != "float" for layer in layers):
            graph_module.recompile()
        return graph_module, layers

    def _per_tensor_error_growth(self, graph_module: fx.GraphModule, levels: int) -> dict[str, float]:
        """Per linear node: its output error on the example inputs with one weight scale over that with
        per-row scales (both with the input quantized as at run time); empty when the option is off."""
        example = tuple(self.context.example_inputs) if self.context is not None else ()
        if not self.options.per_tensor_within > 0 or not example:
            return {}
        growth: dict[str, float] = {}

        def measure(node: fx.Node, x: torch.Tensor) -> None:
            weight_node, bias, transposed = _linear_weight(node)
            weight = attribute(graph_module, weight_node.target).detach()
            weight = weight.t() if transposed else weight
            b = attribute(graph_module, bias.target).detach() if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
            x_scale, x_zero = _dynamic_qparams(x)
            xq = torch.fake_quantize_per_tensor_affine(x, x_scale, x_zero, 0, 255)
            exact = torch.nn.functional.linear(x, weight, b)
            scale = symmetric_weight_scales(weight, 0, levels)
            errors = []
            for s in (scale, scale.max().expand_as(scale).contiguous()):
                w = torch.fake_quantize_per_channel_affine(weight, s, torch.zeros(s.shape, dtype=torch.int32), 0, -128, 127)
                errors.append(float((torch.nn.functional.linear(xq, w, b) - exact).norm()))
            growth[node.name] = errors[1] / errors[0] if errors[0] > 0 else float("inf")

        watched = {}
        for node in graph_module.graph.nodes:
            found = _linear_weight(node) if node.op == "call_function" else None
            val = tensor_val(node.args[0]) if found is not None else None
            if found is not None and val is not None and val.dtype == torch.float32:
                watched[node.args[0]] = (lambda v, n=node, prev=watched.get(node.args[0]): (prev and prev(v), measure(n, v)))
        watch_values(graph_module, watched, [example])
        return growth

    def _skipped(self, name: str, node: fx.Node) -> bool:
        """Whether option ``skip`` names this layer (by module path or node name)."""
        return matches_layer(self.options.skip, (name, node.name))

    def _embedding(self, graph_module: fx.GraphModule, node: fx.Node, index: int, kept_float: set[str]) -> list[dict]:
        """Rewrite one ``aten.embedding`` of a constant float table; its entry for the layer report."""
        if not is_float_table(node):
            return []
        name = layer_name(node)
        if node.name in kept_float:
            return [{"name": name, "node": node.name, "kind": "embedding", "precision": "float", "reason": "max_metric_drop"}]
        if self._skipped(name, node):
            return [{"name": name, "node": node.name, "kind": "embedding", "precision": "float", "reason": "skip"}]
        return [quantize_embedding(graph_module, node, f"_fxqd{index}")]


def is_float_table(node: fx.Node) -> bool:
    """Whether ``node`` is an ``aten.embedding`` of a constant 2-D float table (what :func:`quantize_embedding` takes)."""
    if node.op != "call_function" or node.target is not aten.embedding.default:
        return False
    weight_node = node.args[0]
    val = weight_node.meta.get("val") if isinstance(weight_node, fx.Node) else None
    return (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr" and isinstance(val, torch.Tensor)
            and val.dtype in FLOAT_WEIGHTS and val.dim() == 2)


def quantize_embedding(graph_module: fx.GraphModule, node: fx.Node, prefix: str) -> dict:
    """Replace an embedding lookup (:func:`is_float_table`) by :func:`int8_embedding`: the table stored as
    int8 with one symmetric scale, rows gathered as int8 and dequantized after the lookup. Returns the
    layer-report entry. Shared by int8-dynamic and static int8 (the table's bytes are the same either way).
    """
    weight_node, ids = node.args[0], node.args[1]
    padding_idx = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
    name = layer_name(node)
    graph = graph_module.graph
    table = attribute(graph_module, weight_node.target).detach()
    scale = symmetric_weight_scales(table.reshape(1, -1), 0).reshape(())  # one scale for the table
    prefix = f"{prefix}_{name.replace('.', '_')}"
    graph_module.register_buffer(f"{prefix}_scale", scale)
    with graph.inserting_before(node):
        s = graph.get_attr(f"{prefix}_scale")
        s.meta["val"] = scale
        s.meta[QUANT_META] = {"role": "weight-param", "layer": name}
        q = graph.call_function(int8_embedding, (ids, weight_node, s, int(padding_idx)))
    inherit_meta(q, node)
    q.meta[QUANT_META] = {"role": "int8-embedding", "layer": name}
    node.replace_all_uses_with(q)
    graph.erase_node(node)
    return {"name": name, "node": node.name, "kind": "embedding", "precision": "int8"}


class _DynamicBuilder:
    """``build(enabled)`` of the dynamic-int8 search: the reference graph with the ``enabled`` layers
    (indices into ``nodes``, the quantizable nodes' names) quantized. Picklable for executors that
    ship trials (Ray): the quantizer travels without its compile context, nodes as
    :mod:`fxcompress.analysis.graph_keys` keys."""

    def __init__(self, quantizer: "QuantizeInt8DynamicPass", reference: fx.GraphModule, nodes: list[str]) -> None:
        self.quantizer, self.reference, self.nodes = quantizer, reference, nodes

    def __call__(self, enabled: Any) -> fx.GraphModule:
        on = set(enabled)
        kept_float = {n for i, n in enumerate(self.nodes) if i not in on}
        return self.quantizer._rewrite(copy.deepcopy(self.reference), kept_float)[0]

    def __getstate__(self) -> dict[str, Any]:
        key, ops = node_keys(self.reference)
        by_name = {node.name: node for node in self.reference.graph.nodes}
        return {"quantizer": self.quantizer, "reference": self.reference, "ops": ops,
                "nodes": [key[by_name[name]] for name in self.nodes]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.quantizer, self.reference = state["quantizer"], state["reference"]
        nodes = nodes_by_key(self.reference, state["ops"])
        self.nodes = [nodes[k].name for k in state["nodes"]]
