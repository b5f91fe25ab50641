"""remove-zero-branches: branches that provably compute all-zero tensors.

Zero sources: all-zero parameters/buffers nobody writes, zero factories, a conv/linear/matmul
whose weight (or input) is all zero and whose bias is absent or zero, ``x * 0``. Zero-preserving
ops of a zero (relu, gelu, pooling, means, views, casts: ``f(0) == 0`` exactly) stay zero. Then:

- ``x + 0``, ``x - 0``, ``0 + x`` (also in place) become ``x``, and the branch that fed the zero
  disappears; ``0 += x`` gives a fresh copy of ``x``, so ``x`` itself, or a clone when either is
  written in place later;
- any other use of a zero gets an ``aten.zeros`` of the same shape and dtype;
- an unused in-place write of zero-preserving ops on a zero (``relu_`` of it) changes nothing
  and goes.

Lossless for finite activations: as in any ``x * 0`` rewrite, an inf or NaN activation multiplied
by a zero weight would have given NaN (``multiply_by_zero=False`` keeps such products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import fx

from fxcompress.analysis.aliasing import alias_set, inactive_dropout, may_be_mutated, mutated_inputs
from fxcompress.infra.pass_base import option
from fxcompress.infra.registry import register
from fxcompress.rewrite import (
    NOTHING,
    Match,
    Rule,
    RewriteContext,
    RewritePass,
    argument,
    attribute,
    same_type,
    static_shape,
    tensor_val,
)

aten = torch.ops.aten

_ZERO_FACTORIES = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
# factory -> the argument holding its fill value
_FILL_FACTORIES = {aten.full.default: "fill_value", aten.full_like.default: "fill_value",
                   aten.new_full.default: "fill_value", aten.scalar_tensor.default: "s"}
# f(0) == 0 exactly, elementwise or as a reduction/pooling/view of an all-zero input.
_ZERO_PRESERVING = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
    aten.silu_.default, aten.tanh.default, aten.leaky_relu.default, aten.leaky_relu_.default,
    aten.hardswish.default, aten.hardswish_.default, aten.neg.default, aten.abs.default,
    aten.clone.default, aten.contiguous.default, aten._to_copy.default, aten.to.dtype,
    aten.to.dtype_layout, aten.dropout.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor, aten.select.int,
    aten.narrow.default, aten.unflatten.int,
    aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim,
    aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.max_pool2d.default,
    aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default, aten.max_pool1d.default,
}
_HARDTANH = {aten.hardtanh.default, aten.hardtanh_.default}
# (input, weight) positions: zero when input or weight is zero and the bias is absent or zero.
_WEIGHTED = {
    aten.linear.default: (0, 1), aten.conv1d.default: (0, 1), aten.conv2d.default: (0, 1),
    aten.conv3d.default: (0, 1), aten.convolution.default: (0, 1),
    aten.conv_transpose1d.default: (0, 1), aten.conv_transpose2d.input: (0, 1),
    aten.conv_transpose3d.input: (0, 1),
}
_PRODUCTS = {aten.mm.default, aten.bmm.default, aten.matmul.default}
_IN_PLACE_ABSORB = {aten.add_.Tensor, aten.sub_.Tensor}
_ABSORB = {aten.add.Tensor: (1, 0), aten.sub.Tensor: (1,)}


# --- which nodes are zero ---------------------------------------------------------------------------

def _computes_zero(node: fx.Node, z: Callable[[Any], bool], multiply_by_zero: bool) -> bool:
    target, args = node.target, node.args
    if tensor_val(node) is None:
        return False
    if target in _ZERO_FACTORIES:
        return True
    if target in _FILL_FACTORIES:
        return z(argument(node, _FILL_FACTORIES[target]))
    if target in _ZERO_PRESERVING:
        return z(args[0]) and (target is not aten.dropout.default or inactive_dropout(node))
    if target in _HARDTANH:
        return z(args[0]) and argument(node, "min_val") <= 0 <= argument(node, "max_val")
    if target in _WEIGHTED:
        i, w = _WEIGHTED[target]
        bias = argument(node, "bias")
        return (z(args[i]) or z(args[w])) and (bias is None or z(bias))
    if target in _PRODUCTS:
        return z(args[0]) or z(args[1])
    if target is aten.addmm.default:
        return (z(args[0]) or argument(node, "beta") == 0) and (z(args[1]) or z(args[2]))
    if target in (aten.mul.Tensor, aten.mul.Scalar):
        return multiply_by_zero and (z(args[0]) or z(args[1]))
    if target in (aten.add.Tensor, aten.sub.Tensor):
        return z(args[0]) and z(args[1])
    if target is aten.cat.default:
        return all(z(t) for t in args[0])
    return False


def _writes_keep_zero(node: fx.Node) -> bool:
    """A zero stays zero if every in-place write to it is zero-preserving (relu_ of it)."""
    for member in alias_set(node):
        for user in member.users:
            if member not in mutated_inputs(user):
                continue
            if user.target in _ZERO_PRESERVING or user.target in _HARDTANH:
                continue
            if user.target in _IN_PLACE_ABSORB and len(member.users) == 1:
                continue  # zero += x: the only reader is the write itself (see _absorption)
            return False
    return True


def _zero_nodes(graph_module: fx.GraphModule, multiply_by_zero: bool = True) -> dict[fx.Node, bool]:
    """Nodes whose value is provably all zeros (and stays so: writes to it keep it zero)."""
    zero: dict[fx.Node, bool] = {}
    all_zero_attr: dict[str, bool] = {}

    def z(value: Any) -> bool:
        if isinstance(value, fx.Node):
            return zero.get(value, False)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0

    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            if node.target not in all_zero_attr:
                t = attribute(graph_module, str(node.target))
                all_zero_attr[node.target] = isinstance(t, torch.Tensor) and t.numel() > 0 and not bool(t.any())
            zero[node] = all_zero_attr[node.target] and not may_be_mutated(node)
        elif node.op == "call_function":
            zero[node] = _computes_zero(node, z, multiply_by_zero) and _writes_keep_zero(node)
    return zero


class _ZeroFacts:
    """:func:`_zero_nodes` of the graph, computed once per walk and shared by the pass's rules."""

    def __init__(self, multiply_by_zero: bool) -> None:
        self.multiply_by_zero = multiply_by_zero
        self._ctx: RewriteContext | None = None
        self.zero: dict[fx.Node, bool] = {}

    def refresh(self, ctx: RewriteContext) -> None:
        if ctx is not self._ctx:
            self._ctx, self.zero = ctx, _zero_nodes(ctx.graph_module, self.multiply_by_zero)

    def __call__(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.zero.get(value, False)


M = TypeVar("M")


class _ZeroRule(Rule[M]):
    """A rule of this pass: it reads the shared :class:`_ZeroFacts`, refreshed once per walk."""

    def __init__(self, zero: _ZeroFacts) -> None:
        self.zero = zero

    def prepare(self, ctx: RewriteContext) -> None:
        self.zero.refresh(ctx)


# --- x + 0  =>  x --------------------------------------------------------------------------------------

@dataclass
class _Absorption(Match):
    node: fx.Node
    survivor: fx.Node
    copy: bool  # the result is a fresh tensor and one of the two is written later: keep a clone

    @property
    def root(self) -> fx.Node:
        return self.node


def _safe_to_alias(node: fx.Node, source: fx.Node) -> bool:
    """Replacing ``node`` (a fresh tensor) by ``source`` is safe if no one writes either later."""
    return not may_be_mutated(node) and not may_be_mutated(source)


def _absorption(node: fx.Node, zero: _ZeroFacts) -> _Absorption | None:
    """``node`` as ``x + 0`` / ``x - 0`` / ``0 + x`` (in place or not), or None."""
    if node.op != "call_function" or zero(node):
        return None
    target = node.target
    if target in _IN_PLACE_ABSORB:
        self_arg, other = node.args[0], node.args[1]
        if zero(other) and same_type(node, self_arg):
            return _Absorption(node, self_arg, copy=False)  # x += 0 leaves x (and returns it) unchanged
        if target is aten.add_.Tensor and zero(self_arg) and isinstance(other, fx.Node) and \
                argument(node, "alpha") == 1 and same_type(node, other):
            # zero += x gives a fresh copy of x: x itself if nobody writes either, else a copy.
            return _Absorption(node, other, copy=not _safe_to_alias(node, other))
        return None
    if target not in _ABSORB or len(node.args) < 2:
        return None
    for pos in _ABSORB[target]:
        if pos == 0 and argument(node, "alpha") != 1:
            continue
        survivor = node.args[1 - pos]
        if zero(node.args[pos]) and isinstance(survivor, fx.Node) and same_type(node, survivor):
            return _Absorption(node, survivor, copy=not _safe_to_alias(node, survivor))
    return None


def _copy_format(node: fx.Node) -> torch.memory_format | None:
    """The memory format a clone must have to stand for ``node``; None if it is an unusual one."""
    val = tensor_val(node)
    if val.is_contiguous():
        return torch.contiguous_format
    if val.dim() == 4 and val.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _copy_problem(match: _Absorption) -> str | None:
    if match.copy and _copy_format(match.node) is None:
        return (f"'{match.survivor.name}' or the result is written in place later, so a copy is needed, and the "
                "result's memory layout (neither contiguous nor channels-last) has no clone that keeps it")
    return None


class _AbsorbZeroRule(_ZeroRule[_Absorption]):
    """``x + 0``, ``x - 0``, ``0 + x``, ``x += 0``, ``0 += x``  =>  ``x`` (or a clone of it)."""

    name = "absorb-zero"
    stat = "absorbed"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _Absorption | None:
        return _absorption(node, self.zero)

    def check(self, ctx: RewriteContext, match: _Absorption) -> str | None:
        return _copy_problem(match)

    def rewrite(self, ctx: RewriteContext, match: _Absorption) -> fx.Node:
        if match.copy:
            return ctx.call(aten.clone.default, (match.survivor,), kwargs={"memory_format": _copy_format(match.node)})
        return match.survivor


# --- other uses of a zero  =>  aten.zeros ----------------------------------------------------------------

class _ZeroUse(Match):
    """A zero ``root`` read by ``users`` that need its value (not zero themselves, not absorbing it)."""

    users: list[fx.Node]


class _ZerosRule(_ZeroRule[_ZeroUse]):
    """A computed all-zero tensor read by a node that needs its value  =>  ``aten.zeros`` of its shape."""

    name = "zero-branch"
    stat = "zero_branches"

    def _absorbs(self, user: fx.Node) -> bool:
        """``user`` will be rewritten by :class:`_AbsorbZeroRule` (so it needs no zeros tensor)."""
        match = _absorption(user, self.zero)
        return match is not None and _copy_problem(match) is None

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _ZeroUse | None:
        if node.op != "call_function" or not self.zero(node) or node.target in _ZERO_FACTORIES:
            return None
        users = [u for u in node.users if not self.zero(u) and not self._absorbs(u)]
        return _ZeroUse(node, users=users) if users else None

    def check(self, ctx: RewriteContext, match: _ZeroUse) -> str | None:
        return None if static_shape(match.root) is not None else "all zero, but its shape is dynamic"

    def rewrite(self, ctx: RewriteContext, match: _ZeroUse) -> fx.Node:
        # Every reader gets the zeros tensor, the zero ones too: they stay zero (and go in turn).
        node, val = match.root, tensor_val(match.root)
        shape = list(static_shape(node))
        kwargs = {"dtype": val.dtype, "layout": torch.strided, "device": val.device, "pin_memory": False}
        zeros = ctx.call(aten.zeros.default, (shape,), kwargs=kwargs)
        with ctx.fake_mode:
            ctx.set_val(zeros, torch.zeros(shape, dtype=val.dtype, device=val.device))
        self.zero.zero[zeros] = True
        return zeros


class _DeadZeroWriteRule(_ZeroRule[Match]):
    """An unused zero-preserving in-place op on a zero (``relu_`` of it writes zero)  =>  nothing."""

    name = "drop-zero-write"
    stat = "zero_writes_dropped"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> Match | None:
        if node.op != "call_function" or node.users or not self.zero(node) or not mutated_inputs(node):
            return None
        return Match(node)

    def rewrite(self, ctx: RewriteContext, match: Match) -> Any:
        return NOTHING


@dataclass(frozen=True)
class RemoveZeroBranchesOptions:
    multiply_by_zero: bool = option(
        True, "treat x * 0 as 0 (IEEE gives NaN when x is inf or NaN; lossless for finite activations)")


@register
class RemoveZeroBranchesPass(RewritePass):
    """Replace branches that compute all-zero tensors by ``aten.zeros`` and drop them from sums.

    Zero sources: all-zero parameters/buffers, zero factories, a conv/linear/matmul whose weight
    (or input) is all zero and whose bias is absent or zero, ``x * 0``. Zero-preserving ops of a
    zero (relu, gelu, pooling, means, views, casts) stay zero. ``x + 0`` and ``x - 0`` become
    ``x`` (the branch that fed the zero disappears); any other use of a zero gets an
    ``aten.zeros`` of the same shape and dtype. What these rewrites leave unused is erased.
    As in any x * 0 rewrite, an inf or NaN activation multiplied by a zero weight would have
    given NaN; for finite activations the result is exact.
    """

    name = "remove-zero-branches"
    Options = RemoveZeroBranchesOptions

    def rules(self) -> list[Rule]:
        zero = _ZeroFacts(self.options.multiply_by_zero)
        return [_AbsorbZeroRule(zero), _ZerosRule(zero), _DeadZeroWriteRule(zero)]
