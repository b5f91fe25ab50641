"""fuse-linear-chains: merge consecutive linear layers, and write matmul + bias as linear; lossless.

``linear(linear(x, W1, b1), W2, b2) = linear(x, W2 W1, W2 b1 + b2)``. With
``W1: [mid, in]`` and ``W2: [out, mid]`` the fused layer costs ``in * out`` MACs per row against
``in * mid + mid * out``; it is fused only when neither MACs nor parameters grow, so bottlenecks
(512 -> 16 -> 512) stay factored. ``matmul(x, W^T) + b``, ``mm`` and ``addmm`` with a constant 2-D
weight and a constant 1-D bias are ``linear(x, W, b)``.

The fused layer gets new weight tensors (layers sharing the old ones are untouched); the old
parameters are left unread for ``eliminate-dead-code`` to drop.
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
    permutation, set_argument, tensor_val, weighted_layer,
)

aten = torch.ops.aten


@dataclass
class _ChainMatch(Match):
    first: WeightedLayer
    second: WeightedLayer

    @property
    def root(self) -> fx.Node:
        return self.second.node

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.second.node, self.first.node]


class _LinearChainRule(Rule[_ChainMatch]):
    """linear -> linear with nothing in between  =>  one linear, unless it would cost more."""

    name = "linear-chain"
    stat = "chains_fused"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _ChainMatch | None:
        second = weighted_layer(node)
        first = weighted_layer(node.args[0]) if second is not None and second.kind == "linear" else None
        return _ChainMatch(first, second) if first is not None and first.kind == "linear" else None

    def check(self, ctx: RewriteContext, match: _ChainMatch) -> str | None:
        first, second = match.first, match.second
        reason = other_users(first.node, second.node, "fusing would change what they see")
        reason = reason or ctx.weights_problem(first) or ctx.weights_problem(second)
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

    def rewrite(self, ctx: RewriteContext, match: _ChainMatch) -> fx.Node:
        first, second = match.first, match.second
        w1, w2 = ctx.constant(first.weight), ctx.constant(second.weight)
        weight = (w2.double() @ w1.double()).to(w2.dtype)
        bias = None
        if first.bias is not None or second.bias is not None:
            b1, b2 = ctx.constant(first.bias), ctx.constant(second.bias)
            total = w2.double() @ b1.double() if b1 is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
            bias = (total + b2.double() if b2 is not None else total).to(w2.dtype)
        node = second.node
        set_argument(node, "input", argument(first.node, "input"))
        set_argument(node, "weight", ctx.new_state(second.weight, "weight_fused", weight, node, second.weight))
        new_bias = ctx.new_state(second.weight, "bias_fused", bias, node, second.bias) if bias is not None else None
        set_argument(node, "bias", new_bias)
        return node


_MATMULS = {aten.matmul.default, aten.mm.default}


@dataclass
class _MatmulMatch(Match):
    anchor: fx.Node  # the bias add, or the addmm
    matmul: fx.Node | None  # the matmul/mm feeding the add (None for addmm)
    x: fx.Node
    weight: fx.Node  # get_attr of the 2-D weight
    transposes: list[fx.Node]  # [t] when the weight is read as W^T ([out, in] stored), [] when stored [in, out]
    bias: fx.Node

    @property
    def root(self) -> fx.Node:
        return self.anchor

    @property
    def nodes(self) -> list[fx.Node]:
        consumer = self.matmul if self.matmul is not None else self.anchor
        # a transpose another matmul also reads stays for it
        private = [t for t in self.transposes if set(t.users) == {consumer}]
        return [self.anchor, *([self.matmul] if self.matmul is not None else []), *private]


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

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _MatmulMatch | None:
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

    def rewrite(self, ctx: RewriteContext, match: _MatmulMatch) -> fx.Node:
        weight = match.weight
        if not match.transposes:
            stored = ctx.constant(weight)
            weight = ctx.new_state(match.weight, f"{str(match.weight.target).rpartition('.')[2]}_t",
                                   stored.t().contiguous(), match.anchor, match.weight)
        like = match.matmul if match.matmul is not None else match.anchor
        linear = ctx.call(aten.linear.default, (match.x, weight, match.bias), like, match.anchor)
        ctx.take_type(linear, match.anchor)
        return linear


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
