"""Cross-layer equalization: balance per-channel weight ranges of consecutive layers, exactly.

Per-channel ranges of depthwise networks are uneven (one channel of a folded depthwise filter may
span 100x another's), and a per-tensor int8 activation scale sized for the widest channel leaves
the narrow ones a few levels. For two layers joined by a positively homogeneous function ``f``
(``f(x / s) * s == f(x)`` for ``s > 0``: ReLU, leaky ReLU, or nothing in between), channel ``i`` of the
first layer's output can be divided by ``s_i`` and the second layer's input channel ``i``
multiplied by it without changing the result (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", 2019)::

    W1'[i] = W1[i] / s_i     b1'[i] = b1[i] / s_i     W2'[:, i] = W2[:, i] * s_i
    s_i = sqrt(r1_i / r2_i)  so that  r1'_i = r2'_i = sqrt(r1_i * r2_i)

where ``r1_i`` is the largest ``|W1|`` of output channel ``i`` and ``r2_i`` the largest
``|W2|`` reading input channel ``i`` (grouped and depthwise convs read one group's channels: the
scale is laid out per group). In a chain ``A -> B -> C``, B's output scales and input scales
interact, so the scales are recomputed for all pairs in rounds until they stop moving (or
``rounds`` is reached); the weights are written once at the end, in float64 and cast back. The
result equals the original up to float32 rounding.

**Squeeze-excitation gates.** In EfficientNet / MobileNetV3 blocks the projection conv reads
``act(depthwise(x)) * gate`` with a per-channel gate ``[N, C, 1, 1]``. The activation (SiLU,
hardswish) blocks scaling the depthwise conv, but the gate carries it exactly: the gate becomes
``gate * (1 / s)`` (one small multiply on ``C`` values) and the projection's input channels are
multiplied by ``s``. The depthwise conv's weight ranges stand in for the gated activation's
ranges (data-free); with ``ranges="calibration"`` every pair instead balances the activation
ranges observed on the calibration data against the second layer's weights (``s = sqrt(a / r2)``,
still exact). A rerun starts from the gate scale it finds, so the pass stays idempotent.

**What is not equalized, and why.** ReLU6 / hardtanh clip at a fixed value: ``relu6(x / s) * s``
clips at ``6 s``, not 6, so scaling across it would change the output wherever it clips;
making it exact would need a per-channel clip, which ONNX Runtime does not fuse into its int8
kernels. Hardswish, SiLU, GELU, sigmoid and other smooth activations are not homogeneous at all.
Such pairs are rejected with that reason (``fxcompress compile --why-not`` lists them); so are layers whose
output has other readers (a residual connection sees the unscaled tensor) and shared or
non-constant weights.

**Bias absorption.** Equalization divides ``b1`` by ``s_i``, which can inflate the activation range
of a narrow channel. When nothing sits between the two layers and the second one reads no padding
(a 1x1 / unpadded conv, or a linear layer), ``b1`` moves entirely into the second layer, exactly::

    layer2(layer1(x) + b1) = layer2(layer1(x)) + sum over taps of W2 . b1

so ``b2' = b2 + W2 b1`` and ``b1' = 0``. Across a ReLU, Nagel et al. absorb ``max(0, beta - 3 gamma)``
estimated from the batch norm statistics; that is exact only where every pre-activation stays
above the absorbed amount, and fold-batchnorm (which runs before, in every preset) has consumed
those statistics. This pass chooses exactness: it absorbs only where the identity makes it exact,
and leaves the data-driven correction of what remains to ``correct-bias`` after quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from fxcompress.graph_meta import GATE_SCALE
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import DataDrivenPass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.passes.calibrators import observe_channel_ranges
from fxcompress.passes.cleanup import drop_unused_state
from fxcompress.rewrite import (
    RewriteContext, WeightedLayer, argument, describe_constant_problem, other_users, set_argument, tensor_val,
    weighted_layer,
)

aten = torch.ops.aten

#: Positively homogeneous activations (``f(x / s) * s == f(x)`` for every ``s > 0``).
_HOMOGENEOUS = {aten.relu.default, aten.relu_.default, aten.leaky_relu.default, aten.leaky_relu_.default}

#: Activations seen between layers that are not homogeneous, with the reason in words.
_NOT_HOMOGENEOUS = {
    aten.hardtanh.default: "it clips at a fixed value (ReLU6 / hardtanh): relu6(x / s) * s clips at 6 s, not 6",
    aten.hardtanh_.default: "it clips at a fixed value (ReLU6 / hardtanh): relu6(x / s) * s clips at 6 s, not 6",
    aten.clamp.default: "it clips at fixed values: clamp(x / s) * s clips at s times the bounds",
    aten.clamp_.default: "it clips at fixed values: clamp(x / s) * s clips at s times the bounds",
    aten.hardswish.default: "hardswish is not scale-equivariant (hardswish(x / s) * s != hardswish(x))",
    aten.hardswish_.default: "hardswish is not scale-equivariant (hardswish(x / s) * s != hardswish(x))",
    aten.silu.default: "SiLU is not scale-equivariant (silu(x / s) * s != silu(x))",
    aten.silu_.default: "SiLU is not scale-equivariant (silu(x / s) * s != silu(x))",
    aten.gelu.default: "GELU is not scale-equivariant (gelu(x / s) * s != gelu(x))",
    aten.sigmoid.default: "sigmoid is not scale-equivariant",
    aten.hardsigmoid.default: "hardsigmoid is not scale-equivariant",
    aten.tanh.default: "tanh is not scale-equivariant",
}


#: Marks the per-channel multiply this pass inserts after a squeeze-excitation gate.


@dataclass
class _Pair:
    first: WeightedLayer
    second: WeightedLayer
    activation: fx.Node | None  # None: nothing between the layers (or between the first and the gate)
    gate: fx.Node | None = None  # the per-channel multiply (squeeze-excitation) the second layer reads


def _usable(layer: WeightedLayer | None) -> bool:
    return layer is not None and layer.kind in ("conv", "linear")


def _through_activation(source: Any) -> tuple[WeightedLayer, fx.Node | None] | None:
    """(layer, activation) when ``source`` is a layer's output, directly or through one unary op."""
    if not isinstance(source, fx.Node):
        return None
    layer = weighted_layer(source)
    if _usable(layer):
        return layer, None
    if source.op == "call_function" and source.args and isinstance(source.args[0], fx.Node):
        layer = weighted_layer(source.args[0])
        if _usable(layer) and (source.target in _HOMOGENEOUS or source.target in _NOT_HOMOGENEOUS):
            return layer, source
    return None


def _gate_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(activation, gate) when ``node`` multiplies a conv activation by a per-channel ``[N, C, 1, 1]`` gate."""
    if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    out = tensor_val(node)
    for value, gate in ((a, b), (b, a)):
        gate_val, value_val = tensor_val(gate), tensor_val(value)
        if out is None or gate_val is None or value_val is None or value_val.dim() < 3 or gate_val.dim() != value_val.dim():
            continue
        if value_val.shape != out.shape or any(size != 1 for size in gate_val.shape[2:]):
            continue
        if gate_val.shape[1] == value_val.shape[1] and _through_activation(value) is not None:
            return value, gate
    return None


def _candidate(node: fx.Node) -> _Pair | None:
    """The pair ending at layer ``node``: a layer reading a layer, directly, through one op, or
    through an activation and a squeeze-excitation gate (``act(conv(x)) * gate``)."""
    second = weighted_layer(node)
    if not _usable(second) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    found = _through_activation(source)
    if found is not None:
        return _Pair(found[0], second, found[1])
    operands = _gate_operands(source)
    if operands is not None and second.kind == "conv":
        first, activation = _through_activation(operands[0])
        return _Pair(first, second, activation, gate=source)
    return None


def _check(ctx: RewriteContext, pair: _Pair) -> str | None:
    """Why the pair cannot be equalized exactly, or None."""
    first, second, activation = pair.first, pair.second, pair.activation
    if pair.gate is not None:
        # Only the gate and the second layer change; the first layer is the range estimate.
        reason = other_users(pair.gate, second.node, "scaling its channels would change what they see")
        layers = (second,)
    else:
        if activation is not None and activation.target not in _HOMOGENEOUS:
            return f"'{activation.name}' sits between the layers and {_NOT_HOMOGENEOUS[activation.target]}"
        middle = activation if activation is not None else second.node
        reason = other_users(first.node, middle, "scaling its channels would change what they see")
        if reason is None and activation is not None:
            reason = other_users(activation, second.node, "scaling its channels would change what they see")
        layers = (first, second)
    if reason:
        return reason
    if first.kind != second.kind:
        return f"a {first.kind} layer feeds a {second.kind} layer: their channel layouts differ"
    if first.kind == "conv" and first.channel_dim != 1:
        return "the first layer's output channels are not on dim 1"
    for layer in layers:
        what = f"{layer.kind} '{layer.node.name}'"
        for role, value in (("weight", layer.weight), ("bias", layer.bias)):
            reason = describe_constant_problem(ctx.graph_module, value, f"{what} {role}") or ctx.sharing_problem(
                value, layer.node, f"{what} {role}")
            if reason:
                return reason
    w1 = ctx.constant(first.weight)
    if w1 is None:
        return describe_constant_problem(ctx.graph_module, first.weight, "first layer weight") or "no constant weight"
    w2 = ctx.constant(second.weight)
    if not (w1.is_floating_point() and w2.is_floating_point()):
        return "the weights are not floating point"
    channels = w1.shape[0]
    if w2.dim() < 2 or w2.shape[1] * second.groups != channels:
        return f"'{second.node.name}' does not read the {channels} channels '{first.node.name}' produces"
    return None


def _between(pair: _Pair) -> fx.Node:
    """The tensor the pair rescales: what the second layer reads."""
    return pair.second.node.args[0]


def _input_view(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight`` ``[O, C/g, ...]`` as ``[g, O/g, C/g, taps]``: input channel ``i`` is ``[i // (C/g), :, i % (C/g)]``."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    return weight.reshape(groups, out_channels // groups, per_group, -1)


def _input_ranges(weight: torch.Tensor, groups: int) -> torch.Tensor:
    return _input_view(weight, groups).abs().amax(dim=(1, 3)).reshape(-1)


def _scale_inputs(weight: torch.Tensor, groups: int, scale: torch.Tensor) -> torch.Tensor:
    view = _input_view(weight, groups)
    return (view * scale.reshape(groups, 1, view.shape[2], 1)).reshape(weight.shape)


def _output_ranges(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().reshape(weight.shape[0], -1).amax(dim=1)


def _reads_padding(layer: WeightedLayer) -> bool:
    if layer.kind == "linear":
        return False
    padding = argument(layer.node, "padding")
    if isinstance(padding, str):
        return padding != "valid"
    return any(int(p) != 0 for p in padding)


@dataclass(frozen=True)
class EqualizeLayersOptions:
    rounds: int = option(20, "at most this many rounds of rebalancing chains of pairs (stops earlier once scales settle)")
    absorb_bias: bool = option(True, "move the first layer's bias into the second where that is exact (no activation, no padding)")
    ranges: Literal["weights", "calibration"] = option(
        "weights", "channel ranges to balance: the first layer's weights (data-free) or the activations observed on calibration data")
    calibration_batches: int = option(32, "with ranges='calibration': use at most this many calibration batches")
    min_scale_change: float = option(0.01, "treat a pair as balanced when every scale is within this relative distance of 1")


@register
class EqualizeLayersPass(DataDrivenPass):
    """Cross-layer equalization of conv/linear pairs joined by ReLU or nothing, with exact bias absorption.

    Exact in float (scales commute with ReLU); balances the per-channel ranges that a per-tensor
    int8 scale must cover. The math, and which pairs are rejected (ReLU6, hardswish, SiLU: not
    scale-equivariant) and why, are in the module docstring. Run before ``quantize-int8``.
    """

    name = "equalize-layers"
    Options = EqualizeLayersOptions
    lossless = True

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        opts = self.options
        ctx = RewriteContext(graph_module, self.name)
        pairs: list[_Pair] = []
        rejections: list[Rejection] = []
        for node in graph_module.graph.nodes:
            pair = _candidate(node)
            if pair is None:
                continue
            reason = _check(ctx, pair)
            if reason:
                rejections.append(Rejection("equalize-pair", node.name, reason))
            else:
                pairs.append(pair)
        # Current weights and biases of every layer in a pair, float64, updated in place by rounds.
        weights: dict[fx.Node, torch.Tensor] = {}
        biases: dict[fx.Node, torch.Tensor | None] = {}
        for pair in pairs:
            for layer in (pair.first, pair.second):
                if layer.node not in weights:
                    weights[layer.node] = ctx.constant(layer.weight).detach().double().clone()
                    bias = ctx.constant(layer.bias) if layer.bias is not None else None
                    biases[layer.node] = bias.detach().double().clone() if bias is not None else None
        changed: set[fx.Node] = set()
        # The divisor applied so far to each channel of the tensor between a pair's layers (gate
        # pairs: a rerun starts from its own earlier gate scale).
        divisors = {id(pair): self._current_divisor(ctx, pair) for pair in pairs}
        initial = dict(divisors)  # observed ranges already include these
        observed = self._observed_ranges(graph_module, pairs) if opts.ranges == "calibration" else {}
        rounds = 0
        limit = math.log1p(opts.min_scale_change)
        for rounds in range(1, opts.rounds + 1):
            moved = False
            for pair in pairs:
                first, second = pair.first.node, pair.second.node
                if observed:
                    r1 = observed[_between(pair)] * initial[id(pair)] / divisors[id(pair)]
                elif pair.gate is not None:  # the first layer's weights estimate the gated activation's range
                    r1 = _output_ranges(weights[first]) / divisors[id(pair)]
                else:
                    r1 = _output_ranges(weights[first])
                r2 = _input_ranges(weights[second], pair.second.groups)
                ok = (r1 > 0) & (r2 > 0)
                scale = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), torch.ones_like(r1))
                if float(scale.log().abs().max()) <= limit:
                    continue
                moved = True
                divisors[id(pair)] = divisors[id(pair)] * scale
                if pair.gate is not None:
                    changed.add(second)
                else:
                    changed |= {first, second}
                    weights[first] = weights[first] / scale.reshape(-1, *([1] * (weights[first].dim() - 1)))
                    if biases[first] is not None:
                        biases[first] = biases[first] / scale
                weights[second] = _scale_inputs(weights[second], pair.second.groups, scale)
            if not moved:
                break
        absorbed = 0
        if opts.absorb_bias:
            for pair in pairs:
                first, second = pair.first.node, pair.second.node
                b1 = biases[first]
                if pair.activation is not None or pair.gate is not None or b1 is None or not bool(b1.any()) or _reads_padding(pair.second):
                    continue
                view = _input_view(weights[second], pair.second.groups)  # [g, O/g, C/g, taps]
                per_group = b1.reshape(view.shape[0], 1, view.shape[2], 1)
                shift = (view * per_group).sum(dim=(2, 3)).reshape(-1)
                b2 = biases[second]
                biases[second] = shift if b2 is None else b2 + shift
                biases[first] = torch.zeros_like(b1)
                changed |= {first, second}
                absorbed += 1
        layers = {layer.node: layer for pair in pairs for layer in (pair.first, pair.second)}
        for node in changed:
            self._write(ctx, layers[node], weights[node], biases[node])
        gates = 0
        for pair in pairs:
            if pair.gate is not None and pair.second.node in changed:
                self._write_gate(ctx, pair, divisors[id(pair)])
                gates += 1
        if changed:
            graph_module.graph.lint()
            graph_module.recompile()
            drop_unused_state(graph_module)
        stats = {"pairs": len(pairs), "layers_rescaled": len(changed), "rounds": rounds if changed else 0,
                 "biases_absorbed": absorbed, "gates_scaled": gates}
        return PassResult(graph_module, bool(changed), stats, rejections)

    def _observed_ranges(self, graph_module: fx.GraphModule, pairs: list[_Pair]) -> dict[fx.Node, torch.Tensor]:
        """Per-channel ``max |x|`` on the calibration data of each tensor between a pair's layers."""
        if not pairs:
            return {}
        context = self.context if self.context is not None else CompileContext(example_inputs=())
        batches = context.calibration.take(graph_module, self.name, self.options.calibration_batches)
        nodes = list(dict.fromkeys(_between(pair) for pair in pairs))
        return observe_channel_ranges(graph_module, nodes, batches, dim=1)

    @staticmethod
    def _current_divisor(ctx: RewriteContext, pair: _Pair) -> torch.Tensor:
        """Per-channel divisor already applied to ``pair``'s gate by an earlier run (ones if none)."""
        channels = int(ctx.constant(pair.first.weight).shape[0])
        if pair.gate is None:
            return torch.ones(channels, dtype=torch.float64)
        gate = _gate_operands(pair.gate)[1]
        if GATE_SCALE in gate.meta:
            return 1.0 / ctx.constant(gate.args[1]).detach().double().reshape(-1)
        return torch.ones(channels, dtype=torch.float64)

    def _write_gate(self, ctx: RewriteContext, pair: _Pair, divisor: torch.Tensor) -> None:
        """Make the gate ``pair.gate`` multiplies by ``gate * (1 / divisor)``, reusing an earlier run's multiply."""
        mul = pair.gate
        gate = _gate_operands(mul)[1]
        like = pair.second.weight  # any get_attr of the block: the constant lives next to its state
        shape = [1] * tensor_val(gate).dim()
        shape[1] = -1
        factor = (1.0 / divisor).reshape(shape).to(tensor_val(gate).dtype)
        if GATE_SCALE in gate.meta:  # an earlier run's multiply: replace its constant
            old = gate.args[1]
            gate.args = (gate.args[0], ctx.new_state(like, "gate_scale", factor, gate, old))
            ctx.erase(old)
            return
        constant = ctx.new_state(like, "gate_scale", factor, mul)
        scaled = ctx.call(aten.mul.Tensor, (gate, constant), like=gate, before=mul)
        scaled.meta[GATE_SCALE] = True
        ctx.stamp(scaled, [gate])
        mul.replace_input_with(gate, scaled)

    def _write(self, ctx: RewriteContext, layer: WeightedLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        node, old_weight, old_bias = layer.node, layer.weight, layer.bias
        dtype = ctx.constant(old_weight).dtype
        set_argument(node, "weight", ctx.new_state(old_weight, "weight_equalized", weight.to(dtype), node, old_weight))
        if bias is not None:
            like = old_bias if old_bias is not None else old_weight
            set_argument(node, "bias", ctx.new_state(like, "bias_equalized", bias.to(dtype), node, old_bias))
        ctx.stamp(node, [node])
        ctx.erase(*[v for v in (old_weight, old_bias) if isinstance(v, fx.Node)])


__all__ = ["EqualizeLayersPass"]
