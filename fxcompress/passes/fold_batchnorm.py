"""fold-batchnorm: fold eval batch norm and per-channel affines by constants into the preceding
conv, conv-transpose or linear layer; lossless.

In eval mode a batch norm is a per-channel affine map of its input::

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

Every rewrite makes new weight tensors (layers sharing the old ones are untouched), leaves the old
parameters unread so ``eliminate-dead-code`` drops them, keeps ``meta["val"]`` valid and stamps
provenance (the rewrite engine does, through ``fxcompress.graph_meta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.infra.pass_base import option
from fxcompress.infra.registry import register
from fxcompress.rewrite import (
    Match, RewriteContext, RewritePass, Rule, WeightedLayer, argument, describe_constant_problem, other_users,
    set_argument, tensor_val, weighted_layer,
)

aten = torch.ops.aten

TRAINING_MODE = "batch norm runs in training mode (training=True): it normalizes with batch statistics, not constants"


def _out_channels(layer: WeightedLayer) -> int | None:
    out, dim = tensor_val(layer.node), layer.channel_dim
    return None if out is None or dim is None else int(out.shape[dim])


def _fold_into_layer(
    ctx: RewriteContext, layer: WeightedLayer, scale: torch.Tensor, shift: torch.Tensor, replaced: fx.Node
) -> fx.Node:
    """Make ``layer`` compute ``scale_c * layer(x)_c + shift_c``, the value of ``replaced``; returns it."""
    weight = ctx.constant(layer.weight)
    bias = ctx.constant(layer.bias) if layer.bias is not None else None
    new_weight = layer.scale_output_channels(weight.double(), scale).to(weight.dtype)
    old_bias = bias.double() if bias is not None else torch.zeros_like(scale)
    new_bias = (old_bias * scale + shift).to(bias.dtype if bias is not None else weight.dtype)
    node = layer.node
    set_argument(node, "weight", ctx.new_state(layer.weight, "weight_fused", new_weight, node, layer.weight))
    set_argument(node, "bias", ctx.new_state(layer.weight, "bias_fused", new_bias, node, layer.bias))
    ctx.take_type(node, replaced)
    return node

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
class _BatchNormMatch(Match):
    batch_norm: fx.Node
    layer: WeightedLayer

    @property
    def root(self) -> fx.Node:
        return self.batch_norm

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.batch_norm, self.layer.node]


class _BatchNormRule(Rule[_BatchNormMatch]):
    """conv / conv-transpose / linear -> eval batch norm  =>  the layer with folded weights."""

    name = "batchnorm-into-layer"
    stat = "folded"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _BatchNormMatch | None:
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
        return ctx.weights_problem(layer)

    def rewrite(self, ctx: RewriteContext, match: _BatchNormMatch) -> fx.Node:
        scale, shift = batch_norm_affine(ctx, match.batch_norm)
        return _fold_into_layer(ctx, match.layer, scale, shift, match.batch_norm)


# aten op -> (kind, in place). A Python scalar operand appears in the .Tensor overloads too.
_AFFINE_OPS = {
    aten.mul.Tensor: ("mul", False), aten.mul.Scalar: ("mul", False), aten.mul_.Tensor: ("mul", True),
    aten.div.Tensor: ("div", False), aten.div.Scalar: ("div", False), aten.div_.Tensor: ("div", True),
    aten.add.Tensor: ("add", False), aten.add.Scalar: ("add", False), aten.add_.Tensor: ("add", True),
    aten.sub.Tensor: ("sub", False), aten.sub.Scalar: ("sub", False), aten.sub_.Tensor: ("sub", True),
    aten.rsub.Tensor: ("rsub", False), aten.rsub.Scalar: ("rsub", False),  # rsub(a, c) = c - a
}


@dataclass
class _AffineMatch(Match):
    node: fx.Node
    kind: str
    layer: WeightedLayer
    constant: Any
    layer_first: bool

    @property
    def root(self) -> fx.Node:
        return self.node

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.node, self.layer.node]


class _ChannelAffineRule(Rule[_AffineMatch]):
    """conv / linear -> mul, div, add, sub or rsub by a per-output-channel constant  =>  folded weights."""

    name = "channel-affine-into-layer"
    stat = "affine_folded"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _AffineMatch | None:
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
        return ctx.weights_problem(layer)

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

    def rewrite(self, ctx: RewriteContext, match: _AffineMatch) -> fx.Node:
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
        return _fold_into_layer(ctx, match.layer, scale, shift, match.node)


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
