"""Strided convolutions on few input channels, rewritten as space-to-depth + a stride-1 convolution.

A network's stem (ResNet's 7x7/2 conv on RGB, MobileNet's 3x3/2) has 3 input channels. ONNX
Runtime's int8 convolution gathers the input patch by patch, and with 3 channels each gather moves
3 bytes: in ORT's profiler the int8 stem of ResNet-50 costs several times more per multiply-add
than the rest of the network. The same convolution on a
space-to-depth view of the input (each ``s x s`` block of pixels becomes ``s*s*C`` channels) has
12 input channels and stride 1. benchmarks/quantization.py times int8 with and without this pass
in one run (ResNet-50 and MobileNetV2 both get faster).

The math, for one spatial axis (the other is the same), stride ``s``, kernel ``k``, padding ``p``::

    y[i] = sum_{t<k} W[t] * xpad[s*i + t]

Pad the kernel with zeros to ``s*k2`` taps (``k2 = ceil(k/s)``) and write ``t = s*a + b``::

    y[i] = sum_{a<k2, b<s} W[s*a + b] * xpad[s*(i + a) + b] = sum_a W2[a, b] * z[b][i + a]

where ``z[b][j] = xpad[s*j + b]`` is the space-to-depth of the padded input: a stride-1
convolution with ``k2`` taps over ``s*s*C`` channels. The input is padded on the right until its
size is ``s * (out + k2 - 1)``, so the new convolution needs no padding and gives the same output
size. The added taps multiply zeros: results equal the original up to fp32 summation order.

Only worth it in int8: ORT's fp32 stem is already efficient and becomes slower (more MACs), so
the pass is in the ``int8`` preset only, before quantization (which then quantizes the new weight
to the same int8 values: the zero taps do not move a channel's scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.rewrite import (
    Match, RewriteContext, RewritePass, Rule, WeightedLayer, argument, describe_constant_problem, static_shape,
    tensor_val, weighted_layer,
)
from fxcompress.analysis.shapes import refresh_shapes
from fxcompress.capture import register_leaf_function
from fxcompress.infra.pass_base import PassResult, option
from fxcompress.infra.registry import register
from fxcompress.passes.cleanup import drop_unused_state

aten = torch.ops.aten


@register_leaf_function
def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX ``SpaceToDepth``: ``[N, C, H, W] -> [N, block*block*C, H/block, W/block]``.

    Output channel ``(bh * block + bw) * C + c`` holds ``x[:, c, bh::block, bw::block]`` (the
    ONNX order; ``torch.pixel_unshuffle`` orders channels the other way and exports as a 6-D
    transpose that ORT runs several times slower). In PyTorch it is a reshape and a permute;
    under ``torch.onnx.export`` it is one SpaceToDepth node.
    """
    n, c, h, w = x.shape
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic("SpaceToDepth", (x,), {"blocksize": block}, dtype=x.dtype,
                                       shape=(n, c * block * block, h // block, w // block), version=13)
    blocks = x.reshape(n, c, h // block, block, w // block, block)
    return blocks.permute(0, 3, 5, 1, 2, 4).reshape(n, block * block * c, h // block, w // block)


def space_to_depth_weight(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """The stride-1 weight ``[O, s*s*C, k2, k2]`` equivalent to ``weight`` ``[O, C, k, k]`` at stride ``s``."""
    out_channels, channels, k, _ = weight.shape
    k2 = math.ceil(k / stride)
    padded = weight.new_zeros(out_channels, channels, stride * k2, stride * k2)
    padded[:, :, :k, :k] = weight
    # taps t = s*a + b  ->  [O, C, a, b, a', b']  ->  [O, b, b', C, a, a']  (the space_to_depth channel order)
    taps = padded.reshape(out_channels, channels, k2, stride, k2, stride)
    return taps.permute(0, 3, 5, 1, 2, 4).reshape(out_channels, stride * stride * channels, k2, k2)


def _spatial_size(node: fx.Node) -> tuple[int, int] | None:
    """(height, width) of a 4-D tensor when both are plain integers (the batch may be symbolic)."""
    val = tensor_val(node)
    if val is None or val.dim() != 4 or not all(type(s) is int for s in val.shape[2:]):
        return None
    return int(val.shape[2]), int(val.shape[3])


@dataclass
class _StemMatch(Match):
    layer: WeightedLayer
    stride: int
    kernel: int

    @property
    def root(self) -> fx.Node:
        return self.layer.node

    @property
    def padding(self) -> int:
        return int(argument(self.layer.node, "padding")[0])  # check() made sure both axes agree

    def right_pads(self) -> tuple[int, int] | None:
        """Bottom and right padding that make the input ``s * (out + k2 - 1)`` long, or None if unknown."""
        in_size, out_size = _spatial_size(self.layer.node.args[0]), _spatial_size(self.layer.node)
        if in_size is None or out_size is None:
            return None
        k2 = math.ceil(self.kernel / self.stride)
        bottom, right = (self.stride * (out + k2 - 1) - size - self.padding for size, out in zip(in_size, out_size))
        return bottom, right


class _SpaceToDepthRule(Rule[_StemMatch]):
    """conv2d, stride s > 1, few input channels  =>  pad -> space_to_depth -> conv2d stride 1."""

    name = "conv-space-to-depth"
    stat = "convs_rewritten"

    def __init__(self, max_in_channels: int) -> None:
        self.max_in_channels = max_in_channels

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _StemMatch | None:
        layer = weighted_layer(node)
        if layer is None or layer.kind != "conv" or node.target not in (aten.conv2d.default, aten.convolution.default):
            return None
        if layer.groups != 1:  # depthwise convs have one input channel per group: not a stem
            return None
        weight_shape = static_shape(layer.weight)
        if weight_shape is None or len(weight_shape) != 4 or weight_shape[1] > self.max_in_channels:
            return None
        stride = argument(node, "stride")
        if not (isinstance(stride, (list, tuple)) and len(stride) == 2 and stride[0] == stride[1] and stride[0] > 1):
            return None
        return _StemMatch(layer, int(stride[0]), int(weight_shape[2]))

    def check(self, ctx: RewriteContext, match: _StemMatch) -> str | None:
        node, layer = match.layer.node, match.layer
        padding, dilation = argument(node, "padding"), argument(node, "dilation")
        if isinstance(padding, str) or len(set(padding)) != 1:
            return f"padding {padding} is not the same number on both axes"
        if any(d != 1 for d in dilation):
            return f"dilated convolution (dilation {list(dilation)})"
        if node.target is aten.convolution.default and (argument(node, "transposed") or any(argument(node, "output_padding"))):
            return "transposed convolution"
        weight_shape = static_shape(layer.weight)
        if weight_shape[2] != weight_shape[3]:
            return f"kernel {weight_shape[2]}x{weight_shape[3]} is not square"
        right_pads = match.right_pads()
        if right_pads is None:
            return "the input's height and width are not fixed numbers (symbolic or unknown)"
        if min(right_pads) < 0:
            return "the input would have to be cropped (output size is not ceil-aligned to the stride)"
        return describe_constant_problem(ctx.graph_module, layer.weight, "conv weight") or ctx.sharing_problem(
            layer.weight, node, "conv weight")

    def rewrite(self, ctx: RewriteContext, match: _StemMatch) -> fx.Node:
        node, layer, s, p = match.layer.node, match.layer, match.stride, match.padding
        weight = ctx.constant(layer.weight)
        bias = layer.bias
        x = node.args[0]
        bottom, right = match.right_pads()
        pads = [p, right, p, bottom]  # constant_pad_nd: (before, after) pairs from the last dimension backwards
        padded = ctx.call(aten.constant_pad_nd.default, (x, pads, 0.0))
        blocks = ctx.call(space_to_depth, (padded, s))
        new_weight = ctx.new_state(layer.weight, "weight_s2d", space_to_depth_weight(weight, s), node, layer.weight)
        conv = ctx.call(aten.conv2d.default, (blocks, new_weight, bias, [1, 1], [0, 0], [1, 1], 1))
        for new in (padded, blocks):  # their values differ from the conv's; shapes are refreshed below
            new.meta.pop("val", None)
            new.meta.pop("tensor_meta", None)
        return conv


@dataclass(frozen=True)
class ConvSpaceToDepthOptions:
    max_in_channels: int = option(4, "rewrite strided 2-D convs with at most this many input channels")


@register
class ConvSpaceToDepthPass(RewritePass):
    """Rewrite strided 2-D convs on few input channels (network stems) as space-to-depth + stride-1 conv.

    Exact up to fp32 summation order. Speeds up ORT's int8 convolution, whose per-patch gathers
    are slow for 3 input channels; used by the ``int8`` preset before quantization.
    """

    name = "conv-space-to-depth"
    Options = ConvSpaceToDepthOptions
    lossless = True

    def rules(self) -> list[Rule]:
        return [_SpaceToDepthRule(self.options.max_in_channels)]

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        result = super().call(graph_module)
        if result.modified:
            refresh_shapes(graph_module)  # the new pad / space_to_depth nodes get their values
            drop_unused_state(graph_module)  # the replaced weights, so the export does not carry them
        return result
