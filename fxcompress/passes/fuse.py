"""Fusion: fold batch norm and per-channel affines into weights, merge linear chains, mark
layer + activation units, collapse reshape and permute chains. All four passes are lossless.

**Batch-norm folding.** In eval mode a batch norm is a per-channel affine map of its input::

    BN(y)_c = gamma_c * (y_c - mean_c) / sqrt(var_c + eps) + beta_c = s_c * y_c + t_c
    s_c = gamma_c / sqrt(var_c + eps)        t_c = beta_c - s_c * mean_c

(``gamma = 1`` and ``beta = 0`` without affine parameters). A conv or linear layer computes each
output channel from its own slice of the weight, ``y_c = W_c (*) x + b_c``, so::

    BN(conv(x, W, b)) = conv(x, W', b')      W'_c = s_c * W_c      b'_c = s_c * b_c + t_c

``W_c`` is row ``c`` of a linear weight ``[out, in]`` and filter ``c`` of a conv weight
``[out, in / groups, *k]`` (grouped and depthwise convs alike). A transposed conv's weight is
``[in, out / groups, *k]``: channel ``c`` is column ``c mod (out / groups)`` within the rows of
group ``c div (out / groups)``. A following ``y * a + d`` (also ``- d`` and ``/ a``) by constants
that broadcast along output channels only is the same map with ``s = a``, ``t = d``. The fold is
computed in float64 and cast back to the weight's dtype.

**Linear chains.** ``linear(linear(x, W1, b1), W2, b2) = linear(x, W2 W1, W2 b1 + b2)``. With
``W1: [mid, in]`` and ``W2: [out, mid]`` the fused layer costs ``in * out`` MACs per row against
``in * mid + mid * out``; it is fused only when neither MACs nor parameters grow, so bottlenecks
(512 -> 16 -> 512) stay factored. ``matmul(x, W^T) + b``, ``mm`` and ``addmm`` with a constant 2-D
weight and a constant 1-D bias are ``linear(x, W, b)``.

Every rewrite makes new weight tensors (layers sharing the old ones are untouched), leaves the old
parameters unread so ``eliminate-dead-code`` drops them, keeps ``meta["val"]`` valid and stamps
``meta[PROVENANCE_KEY] = {"pass": ..., "from": [replaced node names]}`` (keys: ``fxcompress.graph_meta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.rewrite import (
    PERMUTE_OPS,
    Rule,
    RewritePass,
    RewriteContext,
    WeightedLayer,
    argument,
    describe_constant_problem,
    other_users,
    permutation,
    set_argument,
    static_shape,
    tensor_val,
    weighted_layer,
    writers,
)
from fxcompress.graph_meta import FUSED_ACTIVATION, FUSED_INTO
from fxcompress.infra.pass_base import Pass, PassResult, Rejection, option
from fxcompress.infra.registry import register

aten = torch.ops.aten

TRAINING_MODE = "batch norm runs in training mode (training=True): it normalizes with batch statistics, not constants"


# --- shared checks and the affine fold ----------------------------------------------------------

def _layer_problem(ctx: RewriteContext, layer: WeightedLayer) -> str | None:
    """Why ``layer``'s weight and bias cannot be replaced by folded copies, or None."""
    what = layer.kind.replace("_", "-")
    for role, value in (("weight", layer.weight), ("bias", layer.bias)):
        reason = describe_constant_problem(ctx.graph_module, value, f"{what} {role}") or ctx.sharing_problem(
            value, layer.node, f"{what} {role}"
        )
        if reason:
            return reason
    return None


def _out_channels(layer: WeightedLayer) -> int | None:
    out, dim = tensor_val(layer.node), layer.channel_dim
    return None if out is None or dim is None else int(out.shape[dim])


def _fold_into_layer(
    ctx: RewriteContext, layer: WeightedLayer, scale: torch.Tensor, shift: torch.Tensor, replaced: fx.Node
) -> None:
    """Make ``layer`` compute ``scale_c * layer(x)_c + shift_c`` and take over ``replaced``'s uses."""
    weight = ctx.constant(layer.weight)
    bias = ctx.constant(layer.bias) if layer.bias is not None else None
    new_weight = layer.scale_output_channels(weight.double(), scale).to(weight.dtype)
    old_bias = bias.double() if bias is not None else torch.zeros_like(scale)
    new_bias = (old_bias * scale + shift).to(bias.dtype if bias is not None else weight.dtype)
    old_inputs = [v for v in (layer.weight, layer.bias) if isinstance(v, fx.Node)]
    node = layer.node
    set_argument(node, "weight", ctx.new_state(layer.weight, "weight_fused", new_weight, node, layer.weight))
    set_argument(node, "bias", ctx.new_state(layer.weight, "bias_fused", new_bias, node, layer.bias))
    ctx.take_type(layer.node, replaced)
    ctx.stamp(layer.node, [layer.node, replaced])
    replaced.replace_all_uses_with(layer.node)
    ctx.erase(replaced, *old_inputs)


# --- fold-batchnorm -----------------------------------------------------------------------------

_BATCH_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


def batch_norm_problem(ctx: RewriteContext, bn: fx.Node) -> str | None:
    """Why eval batch norm ``bn`` cannot be read as a constant per-channel affine, or None."""
    for param in _BATCH_NORM_PARAMS:
        reason = describe_constant_problem(ctx.graph_module, argument(bn, param), f"batch norm {param}")
        if reason:
            return reason
    if argument(bn, "running_mean") is None or argument(bn, "running_var") is None:
        return "batch norm has no running statistics"
    return None


def batch_norm_affine(ctx: RewriteContext, bn: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval batch norm as ``x * scale + shift`` per channel, in float64."""
    mean = ctx.constant(argument(bn, "running_mean")).double()
    var = ctx.constant(argument(bn, "running_var")).double()
    gamma, beta = ctx.constant(argument(bn, "weight")), ctx.constant(argument(bn, "bias"))
    gamma = gamma.double() if gamma is not None else torch.ones_like(mean)
    beta = beta.double() if beta is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + float(argument(bn, "eps")))
    return scale, beta - mean * scale


@dataclass
class _BatchNormMatch:
    batch_norm: fx.Node
    layer: WeightedLayer


class _BatchNormRule(Rule[_BatchNormMatch]):
    """conv / conv-transpose / linear -> eval batch norm  =>  the layer with folded weights."""

    name = "batchnorm-into-layer"
    stat = "folded"

    def pattern(self, node: fx.Node) -> _BatchNormMatch | None:
        if node.op != "call_function" or node.target is not aten.batch_norm.default:
            return None
        layer = weighted_layer(node.args[0])
        return _BatchNormMatch(node, layer) if layer is not None else None

    def check(self, ctx: RewriteContext, match: _BatchNormMatch) -> str | None:
        bn, layer = match.batch_norm, match.layer
        if argument(bn, "training"):
            return TRAINING_MODE
        reason = other_users(layer.node, bn, "folding would change what they see") or batch_norm_problem(ctx, bn)
        if reason:
            return reason
        if layer.channel_dim != 1:
            return (
                f"batch norm normalizes dim 1 but '{layer.node.name}' puts its output channels on dim "
                f"{layer.channel_dim}"
            )
        bn_val, layer_val = tensor_val(bn), tensor_val(layer.node)
        if bn_val is None or layer_val is None or bn_val.dtype != layer_val.dtype:
            return "batch norm and layer results have different (or unknown) dtypes"
        return _layer_problem(ctx, layer)

    def rewrite(self, ctx: RewriteContext, match: _BatchNormMatch) -> None:
        scale, shift = batch_norm_affine(ctx, match.batch_norm)
        _fold_into_layer(ctx, match.layer, scale, shift, match.batch_norm)


# aten op -> (kind, in place). A Python scalar operand appears in the .Tensor overloads too.
_AFFINE_OPS = {
    aten.mul.Tensor: ("mul", False), aten.mul.Scalar: ("mul", False), aten.mul_.Tensor: ("mul", True),
    aten.div.Tensor: ("div", False), aten.div.Scalar: ("div", False), aten.div_.Tensor: ("div", True),
    aten.add.Tensor: ("add", False), aten.add.Scalar: ("add", False), aten.add_.Tensor: ("add", True),
    aten.sub.Tensor: ("sub", False), aten.sub.Scalar: ("sub", False), aten.sub_.Tensor: ("sub", True),
    aten.rsub.Tensor: ("rsub", False), aten.rsub.Scalar: ("rsub", False),  # rsub(a, c) = c - a
}


@dataclass
class _AffineMatch:
    node: fx.Node
    kind: str
    layer: WeightedLayer
    constant: Any
    layer_first: bool


class _ChannelAffineRule(Rule[_AffineMatch]):
    """conv / linear -> mul, div, add, sub or rsub by a per-output-channel constant  =>  folded weights."""

    name = "channel-affine-into-layer"
    stat = "affine_folded"

    def pattern(self, node: fx.Node) -> _AffineMatch | None:
        if node.op != "call_function" or node.target not in _AFFINE_OPS:
            return None
        kind, in_place = _AFFINE_OPS[node.target]
        first, second = argument(node, "self"), argument(node, "other")
        for layer_node, constant, layer_first in ((first, second, True), (second, first, False)):
            layer = weighted_layer(layer_node)
            # in place, the op writes into its first operand; c / layer is not affine in layer
            if layer is None or (not layer_first and (in_place or kind in ("div", "rsub"))):
                continue
            if isinstance(constant, (int, float)) or (isinstance(constant, fx.Node) and constant.op == "get_attr"):
                return _AffineMatch(node, kind, layer, constant, layer_first)
        return None

    def check(self, ctx: RewriteContext, match: _AffineMatch) -> str | None:
        node, layer = match.node, match.layer
        reason = other_users(layer.node, node, "folding would change what they see")
        reason = reason or describe_constant_problem(ctx.graph_module, match.constant, f"{match.kind} operand")
        if reason:
            return reason
        out, produced = tensor_val(node), tensor_val(layer.node)
        if out is None or produced is None or out.shape != produced.shape or out.dtype != produced.dtype:
            return f"'{node.name}' changes the shape or dtype of '{layer.node.name}''s output"
        if self._per_channel(ctx, match) is None:
            shape = list(ctx.constant(match.constant).shape)
            return (
                f"constant of shape {shape} does not broadcast along '{layer.node.name}''s output channels "
                f"(dim {layer.channel_dim}) only"
            )
        if match.kind == "div" and bool((self._per_channel(ctx, match) == 0).any()):
            return "divisor has zeros: folding 1/0 into the weights would turn infinities into NaNs"
        return _layer_problem(ctx, layer)

    def _per_channel(self, ctx: RewriteContext, match: _AffineMatch) -> torch.Tensor | None:
        """The constant as one float64 value per output channel, or None if it varies elsewhere."""
        value = ctx.constant(match.constant).double()
        out, dim, channels = tensor_val(match.node), match.layer.channel_dim, _out_channels(match.layer)
        if channels is None or value.dim() > out.dim():
            return None
        padded = (1,) * (out.dim() - value.dim()) + tuple(value.shape)
        if any(size != 1 for i, size in enumerate(padded) if i != dim) or padded[dim] not in (1, channels):
            return None
        return value.reshape(-1).expand(channels).clone()

    def rewrite(self, ctx: RewriteContext, match: _AffineMatch) -> None:
        value = self._per_channel(ctx, match)
        alpha = float(argument(match.node, "alpha")) if match.kind in ("add", "sub", "rsub") else 1.0
        ones, zeros = torch.ones_like(value), torch.zeros_like(value)
        if match.kind == "mul":
            scale, shift = value, zeros
        elif match.kind == "div":
            scale, shift = 1.0 / value, zeros
        elif match.kind == "rsub":  # c - alpha * layer
            scale, shift = -alpha * ones, value
        elif match.layer_first:  # layer + alpha * c, layer - alpha * c
            scale, shift = ones, (alpha if match.kind == "add" else -alpha) * value
        else:  # c + alpha * layer, c - alpha * layer
            scale, shift = (alpha if match.kind == "add" else -alpha) * ones, value
        _fold_into_layer(ctx, match.layer, scale, shift, match.node)


@dataclass(frozen=True)
class FoldBatchNormOptions:
    fold_affine: bool = option(
        True, "also fold a following per-channel mul/div/add/sub by constants into the conv/linear weights"
    )


@register
class FoldBatchNormPass(RewritePass):
    """Fold eval-mode batch norm into the preceding conv, conv-transpose or linear layer.

    Also folds a per-output-channel affine by constants (``conv(x) * a + d``) the same way. The
    math is in the module docstring. Declined candidates are reported as rejections: batch norm in
    training mode, a layer output used elsewhere, non-constant parameters, shared weights.
    """

    name = "fold-batchnorm"
    Options = FoldBatchNormOptions
    lossless = True

    def rules(self) -> list[Rule]:
        return [_BatchNormRule(), *([_ChannelAffineRule()] if self.options.fold_affine else [])]


# --- fuse-linear-chains --------------------------------------------------------------------------

@dataclass
class _ChainMatch:
    first: WeightedLayer
    second: WeightedLayer


class _LinearChainRule(Rule[_ChainMatch]):
    """linear -> linear with nothing in between  =>  one linear, unless it would cost more."""

    name = "linear-chain"
    stat = "chains_fused"

    def pattern(self, node: fx.Node) -> _ChainMatch | None:
        second = weighted_layer(node)
        first = weighted_layer(node.args[0]) if second is not None and second.kind == "linear" else None
        return _ChainMatch(first, second) if first is not None and first.kind == "linear" else None

    def check(self, ctx: RewriteContext, match: _ChainMatch) -> str | None:
        first, second = match.first, match.second
        reason = other_users(first.node, second.node, "fusing would change what they see")
        reason = reason or _layer_problem(ctx, first) or _layer_problem(ctx, second)
        if reason:
            return reason
        w1, w2 = ctx.constant(first.weight), ctx.constant(second.weight)
        if w1.dtype != w2.dtype:
            return "the two linear weights differ in dtype"
        (mid, n_in), n_out = w1.shape, w2.shape[0]
        macs, fused_macs = n_in * mid + mid * n_out, n_in * n_out
        params = macs + (mid if first.bias is not None else 0) + (n_out if second.bias is not None else 0)
        has_bias = first.bias is not None or second.bias is not None
        fused_params = fused_macs + (n_out if has_bias else 0)
        if fused_macs > macs or fused_params > params:
            return (
                f"fusing {n_in} -> {mid} -> {n_out} would cost {fused_macs} MACs and {fused_params} parameters "
                f"instead of {macs} and {params}"
            )
        return None

    def rewrite(self, ctx: RewriteContext, match: _ChainMatch) -> None:
        first, second = match.first, match.second
        w1, w2 = ctx.constant(first.weight), ctx.constant(second.weight)
        weight = (w2.double() @ w1.double()).to(w2.dtype)
        bias = None
        if first.bias is not None or second.bias is not None:
            b1, b2 = ctx.constant(first.bias), ctx.constant(second.bias)
            total = w2.double() @ b1.double() if b1 is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
            bias = (total + b2.double() if b2 is not None else total).to(w2.dtype)
        old_inputs = [v for layer in (first, second) for v in (layer.weight, layer.bias) if isinstance(v, fx.Node)]
        node = second.node
        set_argument(node, "input", argument(first.node, "input"))
        set_argument(node, "weight", ctx.new_state(second.weight, "weight_fused", weight, node, second.weight))
        new_bias = ctx.new_state(second.weight, "bias_fused", bias, node, second.bias) if bias is not None else None
        set_argument(node, "bias", new_bias)
        ctx.stamp(node, [first.node, node])
        ctx.erase(first.node, *old_inputs)


_MATMULS = {aten.matmul.default, aten.mm.default}


@dataclass
class _MatmulMatch:
    anchor: fx.Node  # the bias add, or the addmm
    matmul: fx.Node | None  # the matmul/mm feeding the add (None for addmm)
    x: fx.Node
    weight: fx.Node  # get_attr of the 2-D weight
    transposes: list[fx.Node]  # [t] when the weight is read as W^T ([out, in] stored), [] when stored [in, out]
    bias: fx.Node


def _weight_path(value: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """A matmul's right operand as (2-D get_attr, transposes between them), or None if not constant."""
    if not isinstance(value, fx.Node):
        return None
    if permutation(value) == (1, 0):
        source = value.args[0]
        return (source, [value]) if isinstance(source, fx.Node) and source.op == "get_attr" else None
    val = tensor_val(value)
    return (value, []) if value.op == "get_attr" and val is not None and val.dim() == 2 else None


class _MatmulBiasRule(Rule[_MatmulMatch]):
    """matmul/mm by a constant weight + constant 1-D bias, or addmm  =>  linear."""

    name = "matmul-bias-to-linear"
    stat = "matmuls_to_linear"

    def pattern(self, node: fx.Node) -> _MatmulMatch | None:
        if node.op != "call_function":
            return None
        if node.target is aten.addmm.default:
            if argument(node, "beta") != 1 or argument(node, "alpha") != 1:
                return None
            return self._match(node, None, argument(node, "mat1"), argument(node, "mat2"), argument(node, "self"))
        if node.target not in (aten.add.Tensor, aten.add_.Tensor) or argument(node, "alpha") != 1:
            return None
        first, second = argument(node, "self"), argument(node, "other")
        candidates = [(first, second)] if node.target is aten.add_.Tensor else [(first, second), (second, first)]
        for matmul, bias in candidates:
            if isinstance(matmul, fx.Node) and matmul.op == "call_function" and matmul.target in _MATMULS:
                found = self._match(node, matmul, matmul.args[0], matmul.args[1], bias)
                if found is not None:
                    return found
        return None

    @staticmethod
    def _match(anchor: fx.Node, matmul: fx.Node | None, x: Any, right: Any, bias: Any) -> _MatmulMatch | None:
        path, right_val, bias_val = _weight_path(right), tensor_val(right), tensor_val(bias)
        if path is None or right_val is None or not isinstance(x, fx.Node) or bias_val is None:
            return None
        if bias.op != "get_attr" or tuple(bias_val.shape) != (right_val.shape[1],):
            return None
        weight, transposes = path
        return _MatmulMatch(anchor, matmul, x, weight, transposes, bias)

    def check(self, ctx: RewriteContext, match: _MatmulMatch) -> str | None:
        reason = other_users(match.matmul, match.anchor) if match.matmul is not None else None
        reason = reason or describe_constant_problem(ctx.graph_module, match.weight, "matmul weight")
        reason = reason or describe_constant_problem(ctx.graph_module, match.bias, "bias")
        if reason:
            return reason
        product = tensor_val(match.matmul if match.matmul is not None else match.anchor)
        out, weight, bias = tensor_val(match.anchor), tensor_val(match.weight), tensor_val(match.bias)
        if out is None or product is None or not (out.dtype == product.dtype == weight.dtype == bias.dtype):
            return "matmul, weight and bias differ in dtype"
        if out.shape != product.shape:
            return "the bias add broadcasts the matmul result to a larger shape"
        if not match.transposes:  # stored [in, out]: linear needs a transposed copy
            consumer = match.matmul if match.matmul is not None else match.anchor
            return ctx.sharing_problem(match.weight, consumer, "matmul weight")
        return None

    def rewrite(self, ctx: RewriteContext, match: _MatmulMatch) -> None:
        weight = match.weight
        if not match.transposes:
            stored = ctx.constant(weight)
            weight = ctx.new_state(match.weight, f"{str(match.weight.target).rpartition('.')[2]}_t",
                                   stored.t().contiguous(), match.anchor, match.weight)
        like = match.matmul if match.matmul is not None else match.anchor
        linear = ctx.call(aten.linear.default, (match.x, weight, match.bias), like, match.anchor)
        ctx.take_type(linear, match.anchor)
        replaced = [*match.transposes, *([match.matmul] if match.matmul is not None else []), match.anchor]
        ctx.stamp(linear, replaced)
        match.anchor.replace_all_uses_with(linear)
        ctx.erase(*reversed(replaced), match.weight)


@dataclass(frozen=True)
class FuseLinearChainsOptions:
    chains: bool = option(True, "merge linear -> linear with nothing in between, when that adds no MACs or parameters")
    matmul_to_linear: bool = option(
        True, "turn matmul/mm by a constant 2-D weight plus a constant 1-D bias, and addmm, into linear"
    )


@register
class FuseLinearChainsPass(RewritePass):
    """Merge consecutive linear layers and rewrite matmul + bias as linear (math in the module docstring)."""

    name = "fuse-linear-chains"
    Options = FuseLinearChainsOptions
    lossless = True

    # Walks repeat to a fixed point (RewritePass): in 3 -> 1 -> 2 -> 1 the first pair is refused
    # (it would add MACs) until the second pair has fused into 1 -> 1.
    def rules(self) -> list[Rule]:
        options = self.options
        return [*([_MatmulBiasRule()] if options.matmul_to_linear else []),
                *([_LinearChainRule()] if options.chains else [])]


# --- mark-fused-activations --------------------------------------------------------------------

def _activation_targets() -> frozenset:
    names = ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "gelu_", "silu", "silu_", "sigmoid",
             "sigmoid_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "tanh", "tanh_", "leaky_relu",
             "leaky_relu_", "elu", "elu_", "mish", "mish_", "clamp", "clamp_", "clamp_min", "clamp_min_")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


ACTIVATIONS = _activation_targets()


def _is_unit(layer: fx.Node | None, activation: fx.Node | None) -> bool:
    """True if ``activation`` is an activation reading ``layer``, a conv/linear with no other user."""
    return (
        layer is not None and activation is not None and weighted_layer(layer) is not None
        and activation.op == "call_function" and activation.target in ACTIVATIONS
        and bool(activation.args) and activation.args[0] is layer and list(layer.users) == [activation]
    )


@register
class MarkFusedActivationsPass(Pass):
    """Annotate conv/linear + activation pairs as one unit; the graph itself is unchanged.

    Sets ``meta[FUSED_ACTIVATION] = <activation name>`` on the layer and
    ``meta[FUSED_INTO] = <layer name>`` on the activation, so quantization places no
    Q/DQ between them (ONNX Runtime runs such pairs as one kernel). Marks whose pair no longer
    holds (a later rewrite changed it) are removed.
    """

    name = "mark-fused-activations"
    lossless = True

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in graph_module.graph.nodes}
        cleared = 0
        for node in graph_module.graph.nodes:  # drop stale marks first
            act = node.meta.get(FUSED_ACTIVATION)
            if act is not None and not _is_unit(node, nodes.get(act)):
                del node.meta[FUSED_ACTIVATION]
                cleared += 1
            into = node.meta.get(FUSED_INTO)
            if into is not None and not _is_unit(nodes.get(into), node):
                del node.meta[FUSED_INTO]
                cleared += 1
        marked = 0
        rejections: list[Rejection] = []
        for act in graph_module.graph.nodes:
            if act.op != "call_function" or act.target not in ACTIVATIONS or not act.args:
                continue
            layer = weighted_layer(act.args[0])
            if layer is None:
                continue
            reason = other_users(layer.node, act, "the activation cannot run inside the layer")
            if reason:
                rejections.append(Rejection("layer-activation", act.name, reason))
                continue
            if layer.node.meta.get(FUSED_ACTIVATION) == act.name and act.meta.get(FUSED_INTO) == layer.node.name:
                continue
            layer.node.meta[FUSED_ACTIVATION] = act.name
            act.meta[FUSED_INTO] = layer.node.name
            marked += 1
        modified = bool(marked or cleared)
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified, {"marked": marked, "stale_cleared": cleared}, rejections)


# --- collapse-reshapes -------------------------------------------------------------------------

_RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                       aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim,
                       aten.squeeze.dims})


def _chain_ending_at(node: fx.Node, members: frozenset) -> list[fx.Node] | None:
    """The longest run of ``members`` ops ending at ``node`` whose inner links have one user each.

    None unless ``node`` ends the run (its only user is not one more member reading it).
    """
    if node.op != "call_function" or node.target not in members:
        return None
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in members and users[0].args[0] is node:
        return None
    chain = [node]
    current = node.args[0]
    while (isinstance(current, fx.Node) and current.op == "call_function" and current.target in members
           and len(current.users) == 1):
        chain.insert(0, current)
        current = current.args[0]
    return chain


@dataclass
class _ChainOfViews:
    chain: list[fx.Node]

    @property
    def source(self) -> fx.Node:
        return self.chain[0].args[0]

    @property
    def end(self) -> fx.Node:
        return self.chain[-1]


def _mutation_problem(chain: _ChainOfViews) -> str | None:
    written = [w for n in (chain.source, *chain.chain) for w in writers(n)] if isinstance(chain.source, fx.Node) else []
    if not written:
        return None
    return (
        f"'{written[0].name}' writes in place to a tensor of this chain; merging its views could change what it writes"
    )


def _replace_chain(ctx: RewriteContext, match: _ChainOfViews, target: Any, argument_: Any, identity: bool) -> None:
    if identity:
        match.end.replace_all_uses_with(match.source)
    else:
        node = ctx.call(target, (match.source, argument_), match.end, match.end)
        ctx.stamp(node, match.chain)
        match.end.replace_all_uses_with(node)
    ctx.erase(*reversed(match.chain))


class _ReshapeChainRule(Rule[_ChainOfViews]):
    """view / reshape / flatten / unflatten / (un)squeeze chain  =>  one reshape (or nothing)."""

    name = "reshape-chain"
    stat = "reshape_chains"

    def pattern(self, node: fx.Node) -> _ChainOfViews | None:
        chain = _chain_ending_at(node, _RESHAPES)
        return _ChainOfViews(chain) if chain is not None and len(chain) >= 2 else None

    def check(self, ctx: RewriteContext, match: _ChainOfViews) -> str | None:
        if static_shape(match.source) is None or static_shape(match.end) is None:
            return "the chain has dynamic (symbolic) shapes; only static reshapes are merged"
        return _mutation_problem(match)

    def rewrite(self, ctx: RewriteContext, match: _ChainOfViews) -> None:
        shape = static_shape(match.end)
        _replace_chain(ctx, match, aten.reshape.default, list(shape), shape == static_shape(match.source))


class _PermuteChainRule(Rule[_ChainOfViews]):
    """permute / transpose / t chain  =>  one permute, or nothing when they cancel."""

    name = "permute-chain"
    stat = "permute_chains"

    def pattern(self, node: fx.Node) -> _ChainOfViews | None:
        chain = _chain_ending_at(node, PERMUTE_OPS)
        if chain is None or any(permutation(n) is None for n in chain):
            return None
        if _is_identity(_compose(chain)):
            return _ChainOfViews(chain)
        cancelling = _cancelling_extension(chain)
        if cancelling is not None:
            return _ChainOfViews(cancelling)
        # a lone permute is only worth touching when it does nothing
        return _ChainOfViews(chain) if len(chain) >= 2 else None

    def check(self, ctx: RewriteContext, match: _ChainOfViews) -> str | None:
        return _mutation_problem(match)

    def rewrite(self, ctx: RewriteContext, match: _ChainOfViews) -> None:
        order = _compose(match.chain)
        _replace_chain(ctx, match, aten.permute.default, list(order), _is_identity(order))


def _is_identity(order: tuple[int, ...]) -> bool:
    return order == tuple(range(len(order)))


def _cancelling_extension(chain: list[fx.Node]) -> list[fx.Node] | None:
    """``chain`` extended back through permutes that have other users, up to where it all cancels.

    Merging through a shared permute would add a copy (ONNX transposes materialize), but a chain
    that cancels is removed outright: the shared permutes stay for their other users and
    ``chain``'s end reads their source directly, which costs nothing.
    """
    extended = list(chain)
    current = chain[0].args[0]
    while permutation(current) is not None:
        extended.insert(0, current)
        if _is_identity(_compose(extended)):
            return extended
        current = current.args[0]
    return None


def _compose(chain: list[fx.Node]) -> tuple[int, ...]:
    """One permutation equal to applying ``chain``'s in order: ``out.shape[i] == in.shape[p[i]]``."""
    order = list(range(len(permutation(chain[0]))))
    for node in chain:
        step = permutation(node)
        order = [order[step[i]] for i in range(len(step))]
    return tuple(order)


@dataclass(frozen=True)
class CollapseReshapesOptions:
    reshapes: bool = option(True, "merge chains of view/reshape/flatten/unflatten/(un)squeeze into one reshape")
    permutes: bool = option(True, "merge chains of permute/transpose into one permute; drop chains that cancel")


@register
class CollapseReshapesPass(RewritePass):
    """Collapse chains of shape-only ops and of dimension permutations.

    Reshape-like ops keep the row-major order of elements, so a chain of them equals one reshape
    to the final (static) shape, or nothing if that is the input's shape. Permutations compose.
    A chain whose tensors are written in place anywhere (``relu_`` on a view) is left alone:
    merging views could turn a view into a copy and lose the write.
    """

    name = "collapse-reshapes"
    Options = CollapseReshapesOptions
    lossless = True

    def rules(self) -> list[Rule]:
        options = self.options
        return [*([_ReshapeChainRule()] if options.reshapes else []),
                *([_PermuteChainRule()] if options.permutes else [])]
