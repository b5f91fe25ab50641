"""Static int8 quantization: calibrated fake-quant (Q/DQ) inserted where ONNX Runtime fuses it.

The graph gets ``aten.fake_quantize_per_channel_affine`` on the weights of conv/linear/matmul
(int8, symmetric, one scale per output channel) and ``aten.fake_quantize_per_tensor_affine`` on
activations (uint8 asymmetric by default: U8S8, ORT's fastest x86 kernels). Both export as ONNX
QuantizeLinear/DequantizeLinear; fake-quant has straight-through gradients, so the result stays
trainable (quantization-aware fine-tuning) and runs in PyTorch with the exact arithmetic of the
exported Q/DQ (round half to even, float32 scale, clamped to the integer range).

Placement follows what ORT's QDQ transformer fuses into int8 kernels: every *layer* (conv,
linear, matmul, residual add, concat, average pool) reads dequantized inputs and its output is
quantized right after it, so ``DQ -> Conv -> Q`` becomes QLinearConv, ``DQ -> Gemm -> Q`` QGemm.
A ReLU/ReLU6 (or a not-yet-folded batch norm) directly after a layer is kept inside the group: the
quantize point goes after it, since ORT folds ReLU/Clip into the Q that follows (its range
already starts at zero) and a Q between them would split the fusion. A tensor reaching a layer
through shape-only ops or max pooling (flatten, view, permute, max_pool2d) is quantized again
with the *same* parameters as its source, which is exact and lets ORT drop the redundant pair.

Swish networks (EfficientNet) follow ORT's int8 kernels too: SiLU is rewritten as
``x * sigmoid(x)`` and the sigmoid and the product get quantize points, so ORT runs them as
QLinearSigmoid and QLinearMul, and a squeeze-excitation gate's product (``x * gate``) as
QLinearMul; a float SiLU between two convs would cost two DequantizeLinear, a Sigmoid, a Mul and a
QuantizeLinear on the full activation. Multiplies and sigmoids, like residual adds, are quantized
only between tensors that are quantized anyway.

Transformers follow the same rule with what ORT has int8 kernels for (QGemm, QLinearMatMul,
MatMulIntegerToFloat) and what it runs in float (LayerNormalization, Softmax, Gelu): a residual
add read by a LayerNorm stays float (ORT fuses the pair as SkipLayerNormalization; a QLinearAdd
there only adds a DequantizeLinear), a matmul of two activations feeding softmax gets no Q
after it (ORT's MatMulIntegerToFloat writes float), and the q/k/v pieces split out of one qkv
projection reuse its parameters, so ORT drops the Q/DQ pairs around the split. Trained
transformers' per-channel activation outliers are the job of ``smooth-activations``, which the
``int8`` preset runs first.

Each quantize point is one tensor quantized once, read by all of its consumers, as ORT's own
quantizer does. Layers can be kept in float by name or kind (``skip``), by position
(``first_layer``/``last_layer``) or by accuracy (``max_drift``: the most sensitive layers, measured
one at a time on the calibration data, go back to float until the whole model is within budget).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from torch import fx

from fxcompress.analysis.aliasing import alias_set
from fxcompress.rewrite import weighted_layer
from fxcompress.rewrite.matchers import attribute
from fxcompress.analysis.graph_keys import node_keys, nodes_by_key
from fxcompress.analysis.sensitivity import (
    MetricTrial, layer_sensitivities, report_trial, select_float_layers, select_float_layers_by_metric,
)
from fxcompress.errors import RecipeError
from fxcompress.graph_meta import FLOAT_CHANNEL_STATS, FUSED_ACTIVATION, MODULE_STACK, QUANT_META, layer_name, matches_layer
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import DataDrivenPass, PassResult, option
from fxcompress.infra.registry import register
from fxcompress.passes.calibrators import (
    CALIBRATORS,
    AffineParams,
    Calibrator,
    affine_params,
    choose_range,
    observe,
    WEIGHT_RANGE_HELP,
    WEIGHT_RANGES,
    float_stats_key,
    sample_channel_means,
    symmetric_weight_scales,
    weight_levels,
)

aten = torch.ops.aten

LAYER_KINDS: tuple[str, ...] = ("conv", "linear", "matmul", "add", "concat", "pool", "mul", "sigmoid")

#: Kinds that only make sense between tensors that are quantized anyway (see ``plan_static``).
_ELEMENTWISE = ("add", "mul", "sigmoid")

_KIND_OF = {
    aten.conv1d.default: "conv", aten.conv2d.default: "conv", aten.conv3d.default: "conv",
    aten.convolution.default: "conv",
    aten.linear.default: "linear",
    aten.matmul.default: "matmul", aten.mm.default: "matmul", aten.bmm.default: "matmul",
    aten.add.Tensor: "add",
    aten.cat.default: "concat",
    aten.adaptive_avg_pool2d.default: "pool", aten.avg_pool2d.default: "pool",
    aten.adaptive_avg_pool1d.default: "pool", aten.avg_pool1d.default: "pool",
    aten.mul.Tensor: "mul",
    aten.sigmoid.default: "sigmoid",
}

#: Ops whose output is a re-arrangement or subset of their input's values: a quantized input stays
#: exactly representable with the same scale and zero point.
_PASS_THROUGH = {
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.unsqueeze.default, aten.contiguous.default, aten.clone.default,
    aten.dropout.default, aten.expand.default, aten.alias.default,
}

#: In-place ops rewritten to their functional form before insertion, so that a quantize node can
#: sit between a tensor and its readers without an in-place op writing to the wrong copy.
_FUNCTIONAL = {
    aten.relu_.default: aten.relu.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.add_.Tensor: aten.add.Tensor,
    aten.clamp_.default: aten.clamp.default,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.sigmoid_.default: aten.sigmoid.default,
    aten.silu_.default: aten.silu.default,
}

_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_LAYER_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_float(node: Any) -> bool:
    val = _val(node)
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def functionalize_inplace(graph: fx.Graph) -> int:
    """Turn ``relu_``/``add_``/``mul_``/``hardtanh_``/``clamp_``/``sigmoid_``/``silu_`` into their functional forms where safe.

    Safe means the written tensor is an intermediate value without views; readers of the tensor
    after the in-place op read the op's result instead (the value they saw before). Returns the
    number of nodes rewritten.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    rewritten = 0
    for node in list(graph.nodes):
        functional = _FUNCTIONAL.get(node.target)
        if functional is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_function" or len(alias_set(source)) > 1:
            continue
        for user in list(source.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(source, node)
        node.target = functional
        rewritten += 1
    return rewritten


def decompose_silu(graph: fx.Graph) -> int:
    """Rewrite every ``silu(x)`` as ``x * sigmoid(x)`` (what the ONNX exporter writes for it anyway).

    ORT has int8 kernels for both halves (QLinearSigmoid, a 256-entry table, and QLinearMul) but
    none for SiLU: with a quantize point after the sigmoid, ``DQ -> Sigmoid -> Q`` and
    ``DQ, DQ -> Mul -> Q`` fuse, where a float SiLU between a conv's Q and the next conv's Q costs
    a DequantizeLinear per reader, a float Sigmoid, a float Mul and a QuantizeLinear (measured on
    EfficientNet-B0: the difference between 1.1x and 1.0x ORT quantize_static's latency). Returns
    the number of SiLUs rewritten.
    """
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.silu.default or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        with graph.inserting_before(node):
            sigmoid = graph.call_function(aten.sigmoid.default, (x,))
            product = graph.call_function(aten.mul.Tensor, (x, sigmoid))
        for new in (sigmoid, product):
            new.meta["val"] = node.meta.get("val")
            new.meta[MODULE_STACK] = node.meta.get(MODULE_STACK, {})
        if x.meta.get(FUSED_ACTIVATION) == node.name:  # the fp32 conv+SiLU mark no longer names a node
            del x.meta[FUSED_ACTIVATION]
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


def _fused_followers(node: fx.Node) -> fx.Node:
    """The last node of ``node``'s fusable tail: an eval batch norm, then a ReLU/ReLU6/clamp at 0.

    Only activations ORT folds into the Q that follows (Relu, Clip from 0) stay inside the group.
    ``mark-fused-activations`` also marks GELU/SiLU/sigmoid pairs (fp32 FusedConv); for int8 a Q
    after those would leave the conv in float (no QLinearConv+SiLU kernel), so the Q goes directly
    after the layer instead (a SiLU then runs as QLinearSigmoid and QLinearMul, see
    :func:`decompose_silu`; other activations between DQ and Q).
    """
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if not user.args or user.args[0] is not current:
            break
        if user.target in _BATCH_NORMS and current is node:
            current = user
            continue
        if _is_clip_at_zero(user):
            return user
        break
    return current


def _is_clip_at_zero(node: fx.Node) -> bool:
    if node.target in (aten.relu.default, aten.relu_.default):
        return True
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        return low == 0
    if node.target in (aten.clamp.default, aten.clamp_.default, aten.clamp_min.default):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        return low == 0
    return False


#: Ops returning pieces of their input (attention's q, k, v out of one qkv projection); a piece
#: taken with ``getitem`` holds a subset of the input's values, so it keeps the input's parameters.
_SPLITS = {aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


def _root(node: fx.Node) -> fx.Node:
    """Walk back through pass-through ops to the tensor whose values ``node`` re-arranges."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        if node.target in _PASS_THROUGH:
            node = node.args[0]
        elif node.target is operator.getitem and node.args[0].target in _SPLITS and isinstance(node.args[0].args[0], fx.Node):
            node = node.args[0].args[0]
        else:
            break
    return node


@dataclass
class QuantLayer:
    """One quantizable op: its kind, name, constant weight (if any) and activation tensors."""

    node: fx.Node
    kind: str
    name: str
    inputs: list[fx.Node]
    output: fx.Node
    weight_index: int | None = None
    weight_axis: int = 0


@dataclass
class QuantPlan:
    """Layers and quantize points of a graph; ``mirrors`` maps a point to the point whose parameters it reuses."""

    layers: list[QuantLayer]
    owners: dict[fx.Node, list[int]] = field(default_factory=dict)
    mirrors: dict[fx.Node, fx.Node] = field(default_factory=dict)

    @property
    def calibrated_points(self) -> list[fx.Node]:
        return [p for p in self.owners if p not in self.mirrors]


def plan_static(graph: fx.Graph, kinds: Sequence[str]) -> QuantPlan:
    """Find the layers of ``kinds`` and the tensors to quantize around them."""
    layers: list[QuantLayer] = []
    for node in graph.nodes:
        kind = _KIND_OF.get(node.target) if node.op == "call_function" else None
        if kind is None or kind not in kinds or not _is_float(node):
            continue
        layer = _make_layer(node, kind)
        if layer is not None:
            layers.append(layer)
    # Residual adds, multiplies and sigmoids are quantized only between tensors that are quantized
    # anyway (conv outputs, block inputs, and in graph order what such ops make of them: a SiLU's
    # sigmoid and product, a squeeze-excitation gate and the gated tensor); an add with a mask or
    # a bias-like constant would get a useless scale.
    base_points = {layer.output for layer in layers if layer.kind not in _ELEMENTWISE}
    base_points |= {_root(x) for layer in layers if layer.kind not in _ELEMENTWISE for x in layer.inputs}
    kept = []
    for layer in layers:
        if layer.kind in _ELEMENTWISE:
            if not all(_root(x) in base_points for x in layer.inputs):
                continue
            base_points.add(layer.output)
        kept.append(layer)
    # A transformer's residual adds feed LayerNorm, which ORT runs in float (fused with the add
    # as SkipLayerNormalization): a QLinearAdd there breaks that fusion and adds a
    # DequantizeLinear, so such an add stays float unless a quantized layer also reads it.
    # A multiply by a constant (equalize-layers' scale on a squeeze-excitation gate) is quantized
    # only for a quantized reader: ORT runs it in float, and the Q after it is what lets the
    # gated product run as QLinearMul. Dropping one can leave the layer before it read by no
    # quantized layer, hence the fixed point.
    while True:
        consumed = {_root(x) for layer in kept for x in layer.inputs}
        useful = [layer for layer in kept if layer.output in consumed or not _needs_quantized_reader(layer)]
        if len(useful) == len(kept):
            break
        kept = useful
    plan = QuantPlan(kept)
    for index, layer in enumerate(kept):
        # A matmul of two activations (attention scores) is quantized after it only for a
        # quantized reader (which owns the point as its input): ORT runs DQ -> MatMul with a float
        # output as MatMulIntegerToFloat, so a Q before softmax would only add a Q/DQ pair. Convs
        # and linears keep theirs: QLinearConv and QGemm need it (measured: without it ORT runs the
        # linear as a float Gemm on dequantized weights, slower than fp32).
        own_output = layer.kind != "matmul" or layer.weight_index is not None
        for x in [*layer.inputs, *([layer.output] if own_output else [])]:
            plan.owners.setdefault(x, []).append(index)
    for point in list(plan.owners):
        root = _root(point)
        if root is not point and root in plan.owners:
            plan.mirrors[point] = root
    return plan


def _needs_quantized_reader(layer: QuantLayer) -> bool:
    if layer.kind == "add":
        return any(user.target in _LAYER_NORMS for user in layer.output.users)
    if layer.kind == "mul":
        return len(layer.inputs) < len(layer.node.args[:2])  # one operand is a constant
    return False


def _make_layer(node: fx.Node, kind: str) -> QuantLayer | None:
    name = layer_name(node)
    args = node.args
    if kind in ("conv", "linear"):
        x, w = args[0], args[1]
        if not (_is_float(x) and isinstance(w, fx.Node)):
            return None
        if w.op == "get_attr":
            return QuantLayer(node, kind, name, [x], _fused_followers(node), weight_index=1, weight_axis=0)
        return QuantLayer(node, kind, name, [x, w] if _is_float(w) else [x], _fused_followers(node))
    if kind == "matmul":
        a, b = args[0], args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and _is_float(a) and _is_float(b)):
            return None
        if b.op == "get_attr":
            return QuantLayer(node, kind, name, [a], _fused_followers(node), weight_index=1,
                              weight_axis=_val(b).dim() - 1)
        return QuantLayer(node, kind, name, [a, b], _fused_followers(node))
    if kind == "add":
        a, b = args[0], args[1]
        alpha = node.kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if alpha != 1 or not all(isinstance(v, fx.Node) and _is_float(v) and v.op != "get_attr" for v in (a, b)):
            return None
        if _val(a).shape != _val(b).shape:
            return None
        return QuantLayer(node, kind, name, [a, b], _fused_followers(node))
    if kind == "mul":
        # Two activations (SiLU's x * sigmoid(x), a squeeze-excitation gate; broadcasting is fine
        # for QLinearMul), or one activation times a constant tensor.
        a, b = args[0], args[1]
        if not all(isinstance(v, fx.Node) and _is_float(v) for v in (a, b)):
            return None
        activations = [v for v in (a, b) if v.op != "get_attr"]
        if not activations:
            return None
        return QuantLayer(node, kind, name, activations, _fused_followers(node))
    if kind == "sigmoid":
        x = args[0]
        if not (isinstance(x, fx.Node) and _is_float(x) and x.op != "get_attr"):
            return None
        return QuantLayer(node, kind, name, [x], node)
    if kind == "concat":
        tensors = args[0]
        if not tensors or not all(isinstance(t, fx.Node) and _is_float(t) and t.op != "get_attr" for t in tensors):
            return None
        return QuantLayer(node, kind, name, list(dict.fromkeys(tensors)), _fused_followers(node))
    if kind == "pool":
        x = args[0]
        if not _is_float(x):
            return None
        return QuantLayer(node, kind, name, [x], node)
    return None



class QuantizedBuilder:
    """``build(enabled)`` of the per-layer search: :func:`build_quantized` over one plan.

    Picklable, so that an executor (``CompileOptions(executor=)``, e.g. Ray) can run the search's
    trials in other processes or on other machines: nodes travel as
    :mod:`fxcompress.analysis.graph_keys` keys.
    """

    def __init__(self, graph_module: fx.GraphModule, plan: QuantPlan, params: dict[fx.Node, AffineParams],
                 weight_levels: int = 127) -> None:
        self.graph_module, self.plan, self.params, self.weight_levels = graph_module, plan, params, weight_levels

    def __call__(self, enabled: Sequence[int]) -> fx.GraphModule:
        return build_quantized(self.graph_module, self.plan, self.params, set(enabled), self.weight_levels)

    def __getstate__(self) -> dict[str, Any]:
        key, ops = node_keys(self.graph_module)
        plan = self.plan
        return {
            "graph_module": self.graph_module,
            "ops": ops,
            "layers": [replace(layer, node=key[layer.node], inputs=[key[n] for n in layer.inputs], output=key[layer.output])
                       for layer in plan.layers],
            "owners": {key[point]: owners for point, owners in plan.owners.items()},
            "mirrors": {key[point]: key[source] for point, source in plan.mirrors.items()},
            "params": {key[node]: value for node, value in self.params.items()},
            "weight_levels": self.weight_levels,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.graph_module = state["graph_module"]
        nodes = nodes_by_key(self.graph_module, state["ops"])
        layers = [replace(layer, node=nodes[layer.node], inputs=[nodes[n] for n in layer.inputs], output=nodes[layer.output])
                  for layer in state["layers"]]
        self.plan = QuantPlan(layers, {nodes[k]: v for k, v in state["owners"].items()},
                              {nodes[k]: nodes[v] for k, v in state["mirrors"].items()})
        self.params = {nodes[k]: v for k, v in state["params"].items()}
        self.weight_levels = state.get("weight_levels", 127)


def build_quantized(graph_module: fx.GraphModule, plan: QuantPlan, params: dict[fx.Node, AffineParams],
                    enabled: set[int], weight_levels: int = 127) -> fx.GraphModule:
    """A new GraphModule (sharing ``graph_module``'s weights) with the ``enabled`` layers quantized.

    Weights are quantized per channel to ``-weight_levels..weight_levels`` (63: option ``weight_range``).

    A quantize point is inserted when any of its layers is enabled; every reader of the tensor
    then reads the quantized value (one tensor, one quantization, as ORT's own quantizer does).
    """
    graph = fx.Graph()
    # The codegen carries the model's input/output structure (a tensor, not a 1-tuple; dicts; kwargs).
    graph._codegen = copy.deepcopy(graph_module.graph._codegen)
    remap: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(graph_module.graph, remap)
    graph.output(out)
    result = fx.GraphModule(graph_module, graph, class_name="GraphModule")
    result._tracer_cls = graph_module._tracer_cls  # what torch.load rebuilds it with (capture.ReloadTracer)
    result.meta.update(graph_module.meta)
    active = [p for p, owners in plan.owners.items() if any(i in enabled for i in owners)]
    for point in active:
        node = remap[point]
        qp = params[plan.mirrors.get(point, point)]
        with graph.inserting_after(node):
            fq = graph.call_function(aten.fake_quantize_per_tensor_affine.default,
                                     (node, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max))
        fq.meta["val"] = node.meta.get("val")
        fq.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        fq.meta[QUANT_META] = {"role": "activation", "tensor": point.name, "scale": qp.scale, "zero_point": qp.zero_point}
        node.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
    for index in sorted(enabled):
        layer = plan.layers[index]
        if layer.weight_index is None:
            continue
        op = remap[layer.node]
        weight_node = op.args[layer.weight_index]
        weight = attribute(result, weight_node.target).detach()
        axis = layer.weight_axis
        scale = symmetric_weight_scales(weight, axis, weight_levels)
        prefix = f"_fxq{index}_{layer.name.replace('.', '_')}"
        result.register_buffer(f"{prefix}_scale", scale)
        result.register_buffer(f"{prefix}_zero_point", torch.zeros(scale.shape, dtype=torch.int32))
        with graph.inserting_before(op):
            s = graph.get_attr(f"{prefix}_scale")
            z = graph.get_attr(f"{prefix}_zero_point")
            fq = graph.call_function(aten.fake_quantize_per_channel_affine.default,
                                     (weight_node, s, z, axis, -128, 127))
        for n, v in ((s, scale), (z, torch.zeros(scale.shape, dtype=torch.int32))):
            n.meta["val"] = v
            n.meta[QUANT_META] = {"role": "weight-param", "layer": layer.name}
        fq.meta["val"] = weight_node.meta.get("val")
        fq.meta[QUANT_META] = {"role": "weight", "layer": layer.name, "axis": axis}
        op.replace_input_with(weight_node, fq)
    graph.lint()
    result.recompile()
    return result


def _matches(layer: QuantLayer, patterns: Sequence[str]) -> bool:
    return matches_layer(patterns, (layer.name, layer.node.name), kind=layer.kind)


@dataclass(frozen=True)
class QuantizeInt8Options:
    calibrator: Calibrator = option("minmax", "activation range: minmax, percentile, entropy (KL) or mse")
    percentile: float = option(99.99, "percentile of |x| the percentile calibrator keeps (0-100]")
    activation_dtype: Literal["uint8", "int8"] = option("uint8", "uint8 asymmetric (U8S8: ORT's fastest x86 kernels) or int8 symmetric")
    ops: tuple[str, ...] = option(LAYER_KINDS, "layer kinds to quantize: conv, linear, matmul, add, concat, pool, mul, sigmoid")
    skip: tuple[str, ...] = option((), "layers kept in float: module paths/fnmatch patterns ('layer4.*', 'fc') or kinds ('add')")
    first_layer: Literal["int8", "float"] = option("int8", "precision of the first conv/linear/matmul layer")
    last_layer: Literal["int8", "float"] = option("int8", "precision of the last conv/linear/matmul layer")
    max_drift: float | None = option(None, "keep the most sensitive layers in float until drift on calibration data is under this")
    calibration_batches: int = option(256, "use at most this many calibration batches")
    sensitivity_batches: int = option(4, "calibration batches used to measure each layer's sensitivity (with max_drift)")
    embeddings: bool = option(True, "store embedding tables as int8 (an int8 Gather, one scale per table), as int8-dynamic does")
    weight_range: str = option("auto", WEIGHT_RANGE_HELP + " and activations are uint8")

    def __post_init__(self) -> None:
        unknown = [k for k in self.ops if k not in LAYER_KINDS]
        if unknown:
            raise RecipeError(f"quantize-int8: unknown layer kinds {unknown} in `ops`.",
                              f"use kinds from {', '.join(LAYER_KINDS)}.")
        if self.calibrator not in CALIBRATORS:
            raise RecipeError(f"quantize-int8: unknown calibrator {self.calibrator!r}.",
                              f"use one of {', '.join(CALIBRATORS)}.")
        if not 0 < self.percentile <= 100:
            raise RecipeError(f"quantize-int8: percentile must be in (0, 100], got {self.percentile}.", "use e.g. 99.99.")
        if self.max_drift is not None and not self.max_drift > 0:
            raise RecipeError(f"quantize-int8: max_drift must be positive, got {self.max_drift}.", "use e.g. 0.02, or leave it unset.")
        if self.weight_range not in WEIGHT_RANGES:
            raise RecipeError(f"quantize-int8: unknown weight_range {self.weight_range!r}.", f"use one of {', '.join(WEIGHT_RANGES)}.")
        if self.calibration_batches < 1 or self.sensitivity_batches < 1:
            raise RecipeError("quantize-int8: calibration_batches and sensitivity_batches must be >= 1.", "use e.g. 256 and 4.")


@register
class QuantizeInt8Pass(DataDrivenPass):
    """Calibrated static int8: per-channel int8 weights, per-tensor uint8 activations, Q/DQ placed for ORT fusion.

    Needs calibration data (``compile(..., calibration=...)``). Reports per layer its precision
    and, with ``max_drift``, its sensitivity in ``stats["layers"]``.
    """

    name = "quantize-int8"
    runs_on = "float"
    Options = QuantizeInt8Options
    lossless = False
    exports_exactly = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        opts = self.options
        plan = plan_static(graph_module.graph, opts.ops)
        if not plan.layers:
            return PassResult(graph_module, False, {"layers": []})
        context = self.context
        if context is None:
            context = CompileContext(example_inputs=())
        batches = context.calibration.take(graph_module, self.name, opts.calibration_batches)
        rewritten = functionalize_inplace(graph_module.graph)
        if "sigmoid" in opts.ops and "mul" in opts.ops:
            rewritten += decompose_silu(graph_module.graph)
        if rewritten:
            graph_module.recompile()
        plan = plan_static(graph_module.graph, opts.ops)  # node identities may have changed targets
        # correct-bias needs each conv/linear's float channel means over the same data: recorded in
        # this pass over it (the nodes carry them into the quantized graph), not in a float pass of its own.
        channel_dims = {layer.node: found.channel_dim for layer in plan.layers
                        if (found := weighted_layer(layer.node)) is not None and found.kind != "conv_transpose"
                        and found.channel_dim is not None}
        recorded: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in channel_dims}
        also = {n: (lambda v, n=n: recorded[n].append(sample_channel_means(v, channel_dims[n], squares=True)))
                for n in channel_dims}
        stats_key = float_stats_key(graph_module)
        stats = observe(graph_module, plan.calibrated_points, batches, opts.calibrator, progress=context.progress, also=also)
        for node, per_batch in recorded.items():
            if len(per_batch) == len(batches):
                node.meta[FLOAT_CHANNEL_STATS] = (stats_key, per_batch)
        params = {node: affine_params(*choose_range(s, opts.calibrator, opts.percentile), opts.activation_dtype)
                  for node, s in stats.items()}
        reasons = self._float_reasons(plan)
        enabled = {i for i in range(len(plan.layers)) if i not in reasons}
        levels = weight_levels(opts.weight_range, opts.activation_dtype == "uint8")
        sensitivity: dict[int, float] = {}
        drift = None
        if opts.max_drift is not None and enabled:
            sample = batches[:opts.sensitivity_batches]
            build = QuantizedBuilder(graph_module, plan, params, levels)
            sensitivity = layer_sensitivities(graph_module, build, sorted(enabled), sample)
            kept_float, drift = select_float_layers(graph_module, build, sensitivity, sorted(enabled), sample, opts.max_drift)
            for i in kept_float:
                reasons[i] = "max_drift"
            enabled -= set(kept_float)
        trials: list[MetricTrial] = []
        metric = context.metric
        if metric is not None and metric.max_drop is not None and enabled:
            # Accuracy-aware: drift ranks the layers (cheap), the user's metric picks how many stay in float.
            build = QuantizedBuilder(graph_module, plan, params, levels)
            if not sensitivity:
                sensitivity = layer_sensitivities(graph_module, build, sorted(enabled), batches[:opts.sensitivity_batches])
            ranked = sorted(enabled, key=lambda i: sensitivity.get(i, 0.0), reverse=True)
            kept_float, trials = select_float_layers_by_metric(build, ranked, metric.drop_of, metric.max_drop,
                                                               on_trial=report_trial if context.progress else lambda t: None)
            for i in kept_float:
                reasons[i] = "max_metric_drop"
            enabled -= set(kept_float)
        result = build_quantized(graph_module, plan, params, enabled, levels)
        embeddings = self._quantize_embeddings(result) if opts.embeddings else []
        layers = [{
            "name": layer.name, "kind": layer.kind,
            "precision": "int8" if i in enabled else "float",
            **({"reason": reasons[i]} if i in reasons else {}),
            **({"sensitivity": sensitivity[i]} if i in sensitivity else {}),
        } for i, layer in enumerate(plan.layers)] + embeddings
        out_stats: dict[str, Any] = {
            "quantized_layers": len(enabled),
            "int8_embeddings": sum(e["precision"] == "int8" for e in embeddings),
            "float_layers": len(plan.layers) - len(enabled),
            "calibrator": opts.calibrator,
            "calibration_batches": len(batches),
            "weight_levels": levels,
            "layers": layers,
        }
        if drift is not None:
            out_stats["calibration_drift"] = drift
        if trials:
            out_stats["metric_trials"] = [vars(t) for t in trials]
        return PassResult(result, bool(enabled) or any(e["precision"] == "int8" for e in embeddings), out_stats)

    def _quantize_embeddings(self, graph_module: fx.GraphModule) -> list[dict]:
        """Embedding tables as int8 lookups (the ``embeddings`` option); their layer-report entries."""
        from fxcompress.passes.quantize_dynamic import is_float_table, quantize_embedding  # it imports this module

        entries = []
        for node in [n for n in graph_module.graph.nodes if is_float_table(n)]:
            name = layer_name(node)
            if matches_layer(self.options.skip, (name, node.name), kind="embedding"):
                entries.append({"name": name, "kind": "embedding", "precision": "float", "reason": "skip"})
                continue
            entry = quantize_embedding(graph_module, node, f"_fxqe{len(entries)}")
            entries.append({"name": entry["name"], "kind": "embedding", "precision": "int8"})
        if any(e["precision"] == "int8" for e in entries):
            graph_module.recompile()
        return entries

    def _float_reasons(self, plan: QuantPlan) -> dict[int, str]:
        opts = self.options
        reasons = {i: "skip" for i, layer in enumerate(plan.layers) if _matches(layer, opts.skip)}
        weighted = [i for i, layer in enumerate(plan.layers) if layer.kind in ("conv", "linear", "matmul")]
        if weighted and opts.first_layer == "float":
            reasons.setdefault(weighted[0], "first_layer")
        if weighted and opts.last_layer == "float":
            reasons.setdefault(weighted[-1], "last_layer")
        return reasons


__all__ = ["QuantizeInt8Pass", "QuantPlan", "QuantLayer", "build_quantized", "plan_static", "functionalize_inplace",
           "decompose_silu"]
