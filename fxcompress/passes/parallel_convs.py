"""merge-parallel-convs: structural reparameterization of multi-branch blocks into one conv.

RepVGG, MobileOne and FastViT train blocks whose output is a sum of parallel branches on one
input: k x k convs, a 1 x 1 "scale" conv, and an identity through batch norm. Convolution is
linear in its weight, so once ``fold-batchnorm`` has folded each branch's batch norm into its conv
the sum is one conv::

    conv(x, W1, b1) + conv(x, W2, b2) = conv(x, W1 + W2, b1 + b2)

when both convs read ``x`` with the same stride, dilation and groups and their windows are
centred alike (a 1 x 1 kernel is zero-padded into the middle of a 3 x 3 one; padding 0 for 1 x 1
and 1 for 3 x 3 keeps both centred). An identity branch is a conv whose kernel is 1 at the centre
tap of each channel's own input; an identity through eval batch norm scales that tap by
``gamma / sqrt(var + eps)`` and adds ``beta - mean * gamma / sqrt(var + eps)``. Sums of more than
two branches collapse pairwise over the rewrite engine's fixed-point walks.

This reads the captured graph only: it never calls a model's own ``reparameterize`` / deploy
method, so it works on any network with the pattern, in fp32 up to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.infra.pass_base import NoOptions
from fxcompress.infra.registry import register
from fxcompress.passes.fold_batchnorm import TRAINING_MODE, batch_norm_affine, batch_norm_problem
from fxcompress.rewrite import (
    Match, RewriteContext, RewritePass, Rule, argument, describe_constant_problem, other_users, static_shape, tensor_val,
)

aten = torch.ops.aten
#: sum ops and the sign they give their second operand
_SUMS = {aten.add.Tensor: 1.0, aten.add_.Tensor: 1.0, aten.sub.Tensor: -1.0, aten.sub_.Tensor: -1.0}


def _pair(value: object) -> tuple[int, int]:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


@dataclass(frozen=True)
class _Geometry:
    """Stride, dilation and groups of a 2-D conv, and where its window is centred."""

    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    kernel: tuple[int, int]
    padding: tuple[int, int]

    @property
    def centre_offset(self) -> tuple[int, int] | None:
        """Offset of the window's centre tap from the output position; None for even kernels."""
        if any(k % 2 == 0 for k in self.kernel):
            return None
        return tuple((k - 1) // 2 * d - p for k, d, p in zip(self.kernel, self.dilation, self.padding))


def _conv_geometry(node: fx.Node) -> _Geometry | None:
    shape = static_shape(argument(node, "weight"))
    if shape is None or len(shape) != 4:
        return None
    return _Geometry(_pair(argument(node, "stride")), _pair(argument(node, "dilation")), int(argument(node, "groups")),
                     (shape[2], shape[3]), _pair(argument(node, "padding")))


@dataclass
class _Branch:
    """One summand: a 2-D conv of ``source``, eval batch norm of it, or ``source`` itself."""

    node: fx.Node
    kind: str  # "conv" | "batch_norm" | "identity"


def _branch_of(node: object, source: fx.Node | None = None) -> tuple[_Branch, fx.Node] | None:
    """``node`` as a branch and the tensor it reads; ``source`` given: ``node`` may be it (identity)."""
    if not isinstance(node, fx.Node):
        return None
    if source is not None and node is source:
        return _Branch(node, "identity"), node
    if node.op != "call_function" or not isinstance(node.args[0], fx.Node):
        return None
    if node.target is aten.conv2d.default:
        return _Branch(node, "conv"), node.args[0]
    if node.target is aten.batch_norm.default and len(static_shape(node) or ()) == 4:
        return _Branch(node, "batch_norm"), node.args[0]
    return None


@dataclass
class _ParallelMatch(Match):
    add: fx.Node
    source: fx.Node
    branches: tuple[_Branch, _Branch]
    sign: float  # of the second branch: -1 for a difference

    @property
    def root(self) -> fx.Node:
        return self.add

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.add, *(b.node for b in self.branches if b.kind != "identity")]


class _ParallelBranchesRule(Rule[_ParallelMatch]):
    """conv(x) +/- conv(x) | batch_norm(x) | x (either order)  =>  one conv(x) with summed weights."""

    name = "parallel-branches-into-conv"
    stat = "merged"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _ParallelMatch | None:
        if node.op != "call_function" or node.target not in _SUMS or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            return None
        left, right = node.args
        for first, second in ((left, right), (right, left)):
            found = _branch_of(first)
            if found is None or found[0].kind != "conv":
                continue
            other = _branch_of(second, found[1])
            if other is not None and other[1] is found[1]:
                branches = (found[0], other[0]) if first is left else (other[0], found[0])
                return _ParallelMatch(node, found[1], branches, _SUMS[node.target])
        return None

    def check(self, ctx: RewriteContext, match: _ParallelMatch) -> str | None:
        convs = [b.node for b in match.branches if b.kind == "conv"]
        geometries = [_conv_geometry(c) for c in convs]
        if any(g is None for g in geometries):
            return "a branch conv's weight shape is unknown"
        if len({(g.stride, g.dilation, g.groups) for g in geometries}) > 1:
            return "the branch convs differ in stride, dilation or groups"
        if any(g.centre_offset is None for g in geometries):
            return "a branch conv has an even kernel size: its window has no centre tap to align"
        if len({g.centre_offset for g in geometries}) > 1:
            return "the branch convs' windows are not centred alike (padding does not match kernel size)"
        for branch in match.branches:
            if branch.kind != "identity":
                reason = other_users(branch.node, match.add, "merging would change what they see")
                if reason:
                    return reason
        for conv in convs:
            for role in ("weight", "bias"):
                value = argument(conv, role)
                if value is not None:
                    reason = describe_constant_problem(ctx.graph_module, value, f"branch conv {role}")
                    if reason:
                        return reason
        out, source = tensor_val(match.add), tensor_val(match.source)
        if out is None or source is None or not out.dtype.is_floating_point:
            return "the branches' result type is unknown or not floating point"
        if any(b.kind != "conv" for b in match.branches):
            geometry = geometries[0]
            if geometry.stride != (1, 1) or geometry.centre_offset != (0, 0):
                return "an identity branch needs the conv to keep positions (stride 1, centred window)"
            if out.shape[1] != source.shape[1]:
                return "an identity branch needs as many output channels as input channels"
        for branch in match.branches:
            if branch.kind == "batch_norm":
                if argument(branch.node, "training"):
                    return TRAINING_MODE
                reason = batch_norm_problem(ctx, branch.node)
                if reason:
                    return reason
        return None

    def rewrite(self, ctx: RewriteContext, match: _ParallelMatch) -> fx.Node:
        geometries = {b.node: _conv_geometry(b.node) for b in match.branches if b.kind == "conv"}
        like = max(geometries, key=lambda c: geometries[c].kernel[0] * geometries[c].kernel[1])
        geometry = geometries[like]
        kernel = tuple(max(g.kernel[i] for g in geometries.values()) for i in range(2))
        padding = tuple(p + (k - gk) // 2 * d for p, k, gk, d in
                        zip(geometry.padding, kernel, geometry.kernel, geometry.dilation))
        channels = int(tensor_val(match.add).shape[1])
        weight = torch.zeros(channels, int(tensor_val(match.source).shape[1]) // geometry.groups, *kernel, dtype=torch.float64)
        bias = torch.zeros(channels, dtype=torch.float64)
        for branch, sign in zip(match.branches, (1.0, match.sign)):
            w, b = self._branch_kernel(ctx, branch, weight.shape, kernel)
            weight += sign * w
            bias += sign * b
        dtype = ctx.constant(argument(like, "weight")).dtype
        weight_node = ctx.new_state(argument(like, "weight"), "weight_merged", weight.to(dtype), match.add)
        bias_node = ctx.new_state(argument(like, "weight"), "bias_merged", bias.to(dtype), match.add)
        merged = ctx.call(aten.conv2d.default, (match.source, weight_node, bias_node, list(geometry.stride),
                                                list(padding), list(geometry.dilation), geometry.groups),
                          like=like, before=match.add)
        ctx.take_type(merged, match.add)
        return merged

    @staticmethod
    def _branch_kernel(ctx: RewriteContext, branch: _Branch, shape: torch.Size, kernel: tuple[int, int]):
        """The branch as (weight of ``shape``, bias) in float64, its window centred in ``kernel``."""
        if branch.kind == "conv":
            w = ctx.constant(argument(branch.node, "weight")).double()
            bias_value = argument(branch.node, "bias")
            b = ctx.constant(bias_value).double() if bias_value is not None else torch.zeros(shape[0], dtype=torch.float64)
            top, left = (kernel[0] - w.shape[2]) // 2, (kernel[1] - w.shape[3]) // 2
            padded = torch.zeros(shape, dtype=torch.float64)
            padded[:, :, top:top + w.shape[2], left:left + w.shape[3]] = w
            return padded, b
        channels, per_group = shape[0], shape[1]
        scale, shift = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
        if branch.kind == "batch_norm":
            scale, shift = batch_norm_affine(ctx, branch.node)
        identity = torch.zeros(shape, dtype=torch.float64)
        centre = (kernel[0] // 2, kernel[1] // 2)
        channel = torch.arange(channels)
        identity[channel, channel % per_group, centre[0], centre[1]] = scale
        return identity, shift


@register
class MergeParallelConvsPass(RewritePass):
    """Merge parallel conv / batch-norm / identity branches of one input that are summed into one conv.

    Structural reparameterization (RepVGG, MobileOne, FastViT) on the captured graph, after
    ``fold-batchnorm``. Exact in fp32 up to summation order. Refusals (different strides, windows
    centred differently, a branch output used elsewhere, non-constant weights) are rejections.
    """

    name = "merge-parallel-convs"
    Options = NoOptions
    lossless = True

    def rules(self) -> list[Rule]:
        return [_ParallelBranchesRule()]
