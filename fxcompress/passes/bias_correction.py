"""Empirical bias correction after static int8: remove the mean output error of each quantized layer.

Quantizing a layer's weights and inputs changes its output by an error ``e = y_q - y`` whose mean
over the data is not zero: rounding errors of a depthwise filter with 9 taps, or of a per-tensor
activation scale that is coarse for a channel with a small range, do not average out within one
output channel. A shift of the mean is harmless once but compounds through a deep network
(Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019).
Subtracting ``E[e]`` from the layer's bias, channel by channel, removes it::

    b'_c = b_c - E[y_q - y]_c          (expectation over calibration data, batch and spatial positions)

The expectation is *empirical*: the calibration batches are run through the quantized graph
twice in lockstep, once as quantized and once with every fake-quant an identity (the float
model: quantize-int8 only inserts fake-quant nodes). Layers are corrected in graph order and the
quantized run continues with each corrected bias, so a layer's correction sees the errors that
remain after its predecessors' corrections, as the exported model will.

Only conv and linear layers whose weights quantize-int8 quantized are corrected. A layer is
skipped (with the reason) when its bias is shared with another layer, when it sees fewer than
``min_samples`` values per channel (a mean over too few samples corrects noise), or when its
output channels cannot be located. A layer without a bias gets one. The pass needs the
calibration data given to ``compile`` and changes only biases, so the graph's structure stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.graph_meta import BIAS_CORRECTED
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import DataDrivenPass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.passes.calibrators import require_batches
from fxcompress.passes.quantize import QUANT_META, is_quantized, layer_name
from fxcompress.rewrite import RewriteContext, WeightedLayer, set_argument, weighted_layer

aten = torch.ops.aten

#: Marks a layer whose bias this pass corrected: a second run leaves it alone.

_FAKE_QUANT = {aten.fake_quantize_per_tensor_affine.default, aten.fake_quantize_per_channel_affine.default,
               aten.fake_quantize_per_tensor_affine.tensor_qparams}


def _is_fake_quant(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _FAKE_QUANT and QUANT_META in node.meta


def _quantized_layer(node: fx.Node) -> WeightedLayer | None:
    """``node`` as a conv/linear layer whose weight is fake-quantized by quantize-int8, else None."""
    layer = weighted_layer(node)
    if layer is None or layer.kind == "conv_transpose":
        return None
    weight = layer.weight
    return layer if isinstance(weight, fx.Node) and _is_fake_quant(weight) else None


class _Lockstep:
    """Evaluates one graph on many batches in two modes: quantized, and float (fake-quant = identity).

    Values are dropped once their last reader has run, so memory stays near one forward per batch
    and mode.
    """

    def __init__(self, graph_module: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.graph_module = graph_module
        self.batches = batches
        self.values: dict[str, dict[fx.Node, list[Any]]] = {"quant": {}, "float": {}}
        nodes = list(graph_module.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        self.last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
        self.order = order

    def _attribute(self, target: str) -> Any:
        owner = self.graph_module
        for part in target.split("."):
            owner = getattr(owner, part)
        return owner

    def evaluate(self, node: fx.Node, mode: str) -> list[Any]:
        """Compute (and keep) ``node``'s value for every batch in ``mode``."""
        env = self.values[mode]
        if node.op == "get_attr":  # read when used: a corrected bias is a new get_attr
            return []
        if node.op == "placeholder":
            index = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"].index(node)
            out = [batch[index] for batch in self.batches]
        elif mode == "float" and _is_fake_quant(node):
            source = node.args[0]
            out = ([self._attribute(str(source.target))] * len(self.batches) if source.op == "get_attr"
                   else env[source])
        elif node.op in ("call_function", "call_method", "call_module"):
            out = []
            for i in range(len(self.batches)):
                read = lambda n, i=i: self._attribute(str(n.target)) if n.op == "get_attr" else env[n][i]  # noqa: E731
                args = fx.node.map_arg(node.args, read)
                kwargs = fx.node.map_arg(node.kwargs, read)
                if node.op == "call_function":
                    out.append(node.target(*args, **kwargs))
                elif node.op == "call_method":
                    out.append(getattr(args[0], node.target)(*args[1:], **kwargs))
                else:
                    out.append(self.graph_module.get_submodule(str(node.target))(*args, **kwargs))
        else:  # output
            out = []
        env[node] = out
        return out

    def release(self, done: fx.Node) -> None:
        """Forget values whose last reader is ``done`` (or earlier)."""
        position = self.order[done]
        for env in self.values.values():
            for node in [n for n in env if self.last_use[n] <= position]:
                del env[node]


def _channel_mean(values: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Mean over every dimension but ``dim``, over all batches, in float64."""
    total, count = None, 0
    for value in values:
        moved = value.detach().double().movedim(dim, -1).reshape(-1, value.shape[dim])
        part = moved.sum(0)
        total = part if total is None else total + part
        count += moved.shape[0]
    return total / max(count, 1)


@dataclass(frozen=True)
class CorrectBiasOptions:
    calibration_batches: int = option(32, "use at most this many calibration batches to estimate the mean errors")
    min_samples: int = option(64, "skip layers that see fewer values per output channel than this")


@register
class CorrectBiasPass(DataDrivenPass):
    """Empirical bias correction after ``quantize-int8``: subtract each quantized layer's mean output error.

    Runs the calibration data through the graph as quantized and as float (fake-quant as
    identity) in lockstep, corrects conv/linear biases in graph order; see the module docstring.
    A graph without quantize-int8's fake-quant is left unchanged.
    """

    name = "correct-bias"
    Options = CorrectBiasOptions
    lossless = False
    exports_exactly = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if not is_quantized(graph_module):
            return PassResult(graph_module, False, {"corrected": 0, "not_quantized": True})
        layers = [layer for n in graph_module.graph.nodes if (layer := _quantized_layer(n)) is not None]
        pending = [layer for layer in layers if BIAS_CORRECTED not in layer.node.meta]
        if not pending:
            return PassResult(graph_module, False, {"corrected": 0, "already_corrected": len(layers)})
        context = self.context if self.context is not None else CompileContext(example_inputs=())
        batches = require_batches(context.calibration_batches(), context.example_inputs, self.name,
                                  self.options.calibration_batches)
        ctx = RewriteContext(graph_module, self.name)
        rejections: list[Rejection] = []
        shifts: dict[str, float] = {}
        targets = {layer.node: layer for layer in pending}
        run = _Lockstep(graph_module, batches)
        with torch.no_grad():
            for node in list(graph_module.graph.nodes):
                if node.op == "output":
                    break
                quant = run.evaluate(node, "quant")
                run.evaluate(node, "float")
                layer = targets.get(node)
                if layer is not None:
                    reason, correction = self._correction(ctx, layer, quant, run.values["float"][node])
                    if reason is not None:
                        rejections.append(Rejection("bias-correction", node.name, reason))
                    else:
                        self._apply(ctx, layer, correction)
                        shifts[layer_name(node)] = float(correction.abs().max())
                        run.evaluate(node, "quant")  # downstream layers see the corrected output
                run.release(node)
        if shifts:
            graph_module.recompile()
        stats = {"corrected": len(shifts), "skipped": len(rejections), "calibration_batches": len(batches),
                 "largest_shift": max(shifts.values(), default=0.0)}
        return PassResult(graph_module, bool(shifts), stats, rejections)

    def _correction(self, ctx: RewriteContext, layer: WeightedLayer, quant: list[Any],
                    reference: list[Any]) -> tuple[str | None, torch.Tensor | None]:
        dim = layer.channel_dim
        if dim is None:
            return "the layer's output shape is unknown", None
        bias = layer.bias
        if bias is not None:
            if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
                return "the bias is computed at run time, not a constant", None
            shared = ctx.sharing_problem(bias, layer.node, "bias")
            if shared:
                return shared, None
        samples = sum(q.numel() // q.shape[dim] for q in quant)
        if samples < self.options.min_samples:
            return (f"only {samples} values per output channel in the calibration data (min_samples="
                    f"{self.options.min_samples}): the mean error would be mostly noise"), None
        error = _channel_mean([q - r for q, r in zip(quant, reference)], dim)
        return None, error

    def _apply(self, ctx: RewriteContext, layer: WeightedLayer, error: torch.Tensor) -> None:
        node = layer.node
        weight_source = layer.weight.args[0]  # the get_attr the fake-quant reads
        if layer.bias is None:
            dtype = ctx.constant(weight_source).dtype
            new_bias = (-error).to(dtype)
            set_argument(node, "bias", ctx.new_state(weight_source, "bias_corrected", new_bias, node))
        else:
            old = ctx.constant(layer.bias)
            new_bias = (old.double() - error).to(old.dtype)
            old_node = layer.bias
            set_argument(node, "bias", ctx.new_state(old_node, "bias_corrected", new_bias, node, old_node))
            ctx.erase(old_node)
        node.meta[BIAS_CORRECTED] = True


__all__ = ["CorrectBiasPass"]
