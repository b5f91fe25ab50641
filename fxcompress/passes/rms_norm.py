"""fuse-rms-norm: the RMS normalisation a model writes out by hand becomes one ``aten.rms_norm``.

Llama, Qwen2, Mistral, Gemma and T5 compute their norm as ``x * rsqrt(mean(x**2, -1) + eps)``
(then ``* weight``): five ops in the captured graph, and at ONNX opset 23 five nodes per norm
again, each reading or writing the whole activation. ``aten.rms_norm`` exports there as one
``RMSNormalization`` node (earlier opsets decompose it back, so nothing is lost). Accepted forms:
``x**2`` or ``x*x``; ``mean`` over the last dimension with ``keepdim``; ``rsqrt(v + eps)`` times
``x`` or ``x`` divided by ``sqrt(v + eps)``; ``eps`` a Python number. A following multiplication
by a constant vector of the last dimension's size (the norm's weight), read by nothing else,
becomes the norm's weight; otherwise the weight is a constant of ones (without one, the exporter
would build a ones tensor the size of the activation on every run).

Lossless: ``rms_norm`` computes the same expression (to fp32 rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxcompress.infra.registry import register
from fxcompress.rewrite import Match, Rule, RewriteContext, RewritePass, is_call, tensor_val

aten = torch.ops.aten


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _squared(node: Any) -> fx.Node | None:
    """``x`` if ``node`` is ``x ** 2`` or ``x * x``."""
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_call(node, aten.mul.Tensor) and node.args[0] is node.args[1] and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _inverse_rms(node: Any) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """``(x, eps, [the nodes])`` if ``node`` is ``rsqrt(mean(x**2, -1, keepdim) + eps)`` (without
    the ``rsqrt`` when it is ``sqrt``: the caller divides by it)."""
    if not is_call(node, aten.rsqrt.default, aten.sqrt.default):
        return None
    add = node.args[0]
    if not is_call(add, aten.add.Tensor, aten.add.Scalar) or len(add.args) != 2 or add.kwargs:
        return None
    mean, eps = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
    if not _number(eps) or not is_call(mean, aten.mean.dim):
        return None
    squares = mean.args[0]
    x = _squared(squares)
    value = tensor_val(x)
    dims, keepdim = (list(mean.args[1]) if len(mean.args) > 1 and mean.args[1] is not None else None,
                     mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
    if x is None or value is None or not keepdim or mean.kwargs.get("dtype") is not None:
        return None
    if dims not in ([-1], [value.dim() - 1]):
        return None
    return x, float(eps), [node, add, mean, squares]


class _Norm(Match):
    """``root`` computes the norm of ``x`` (the weight's mul when ``weight`` is absorbed); ``nodes``: the chain."""

    x: fx.Node
    eps: float
    weight: fx.Node | None


def _norm(ctx: RewriteContext, normed: fx.Node, x: fx.Node, eps: float, chain: list[fx.Node]) -> _Norm:
    """The match of a norm computed by ``normed`` (with ``chain`` before it), absorbing its weight if any."""
    width = tensor_val(x).shape[-1] if tensor_val(x) is not None else None
    known = isinstance(width, int) and tensor_val(normed) is not None
    weight = _absorbed_weight(ctx, normed, width) if known else None
    if weight is None:
        return _Norm(normed, *chain, x=x, eps=eps, weight=None)
    return _Norm(next(iter(normed.users)), normed, *chain, x=x, eps=eps, weight=weight)


class _RmsNormRule(Rule[_Norm]):
    name = "rms-norm"
    stat = "rms_norms"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _Norm | None:
        if is_call(node, aten.mul.Tensor) and len(node.args) == 2:
            for x, inverse in (node.args, node.args[::-1]):
                found = _inverse_rms(inverse)
                if found is not None and found[0] is x and inverse.target is aten.rsqrt.default:
                    return _norm(ctx, node, x, found[1], found[2])
        if is_call(node, aten.div.Tensor) and len(node.args) == 2:
            found = _inverse_rms(node.args[1])
            if found is not None and found[0] is node.args[0] and node.args[1].target is aten.sqrt.default:
                return _norm(ctx, node, node.args[0], found[1], found[2])
        return None

    def check(self, ctx: RewriteContext, match: _Norm) -> str | None:
        inner = [n for n in match.nodes[1:] if len(n.users) > 1]
        if inner:
            return (f"'{inner[0].name}' (inside the norm) is also read elsewhere: it would still be computed, "
                    "so one rms_norm would not replace the chain")
        x = tensor_val(match.x)
        if x is None or not x.is_floating_point() or x.dim() == 0 or not isinstance(x.shape[-1], int):
            return "the normalised tensor has no recorded float type or a symbolic last dimension"
        return None

    def rewrite(self, ctx: RewriteContext, match: _Norm) -> fx.Node:
        width = int(tensor_val(match.x).shape[-1])
        weight = match.weight
        if weight is None:
            ones = torch.ones(width, dtype=tensor_val(match.x).dtype)
            weight = ctx.new_constant(ones, f"{match.root.name}_rms_weight")
        return ctx.call(aten.rms_norm.default, (match.x, [width], weight, match.eps))


def _absorbed_weight(ctx: RewriteContext, normed: fx.Node, width: int) -> fx.Node | None:
    """The norm's weight: the constant vector the normalised tensor's only reader multiplies it by."""
    if len(normed.users) != 1:
        return None
    reader = next(iter(normed.users))
    if not is_call(reader, aten.mul.Tensor) or len(reader.args) != 2:
        return None
    other = reader.args[1] if reader.args[0] is normed else reader.args[0]
    value, result = tensor_val(other), tensor_val(reader)
    if value is None or ctx.constant(other) is None or tuple(value.shape) != (width,):
        return None
    if result is None or result.dtype != tensor_val(normed).dtype:
        return None
    return other


@register
class FuseRmsNormPass(RewritePass):
    """Hand-written RMS normalisation (``x * rsqrt(mean(x**2, -1) + eps) * w``) as one ``aten.rms_norm``.

    Exported at opset 23 it is one ``RMSNormalization`` node instead of five or six; lossless.
    """

    name = "fuse-rms-norm"

    def rules(self) -> list[Rule]:
        return [_RmsNormRule()]
