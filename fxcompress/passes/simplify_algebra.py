"""simplify-algebra: remove arithmetic that returns its input.

Identities ``x+0 = x-0 = x*1 = x/1 = x**1 = x``, ``b & True = b | False = b`` (bool ``b``) and
``x | 0 = x``, with a scalar or constant operand that does not broadcast ``x`` to a new shape or
dtype; ``cat([x]) = x``; slices that cover their whole input; attention masks that mask nothing
(all True, or all 0 added to the scores). Every rewrite is lossless: the replacement is the value
the node computed. Permutes that cancel are ``collapse-reshapes``' job, same-shape views and casts
``remove-no-ops``' (``include_no_ops`` applies them here too).

Aliasing: a fresh result (``x + 0`` is a new tensor) is replaced by ``x`` only when no in-place op
writes either one later; ``x.add_(0)`` returns ``x`` itself and is always replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.infra.pass_base import option
from fxcompress.infra.registry import register
from fxcompress.passes.cleanup import NoOpRule
from fxcompress.rewrite import (
    Match,
    Rule,
    RewriteContext,
    RewritePass,
    argument,
    has_argument,
    same_type,
    set_argument,
    tensor_val,
    writers,
)

aten = torch.ops.aten

# op -> (identity element, operand positions that may hold it). Subtraction, division and powers
# only have a right identity; ``alpha`` scales the right operand, so add's left identity needs
# alpha == 1.
_IDENTITIES: dict[Any, tuple[Any, tuple[int, ...]]] = {
    aten.add.Tensor: (0, (1, 0)), aten.add.Scalar: (0, (1,)),
    aten.sub.Tensor: (0, (1,)), aten.sub.Scalar: (0, (1,)),
    aten.mul.Tensor: (1, (1, 0)), aten.mul.Scalar: (1, (1,)),
    aten.div.Tensor: (1, (1,)), aten.div.Scalar: (1, (1,)),
    aten.pow.Tensor_Scalar: (1, (1,)),
    aten.bitwise_or.Tensor: (0, (1, 0)), aten.__or__.Tensor: (0, (1, 0)),
    aten.logical_or.default: (False, (1, 0)),
}
# x & True == x only for bool x (for integers the identity is all ones bits).
_BOOL_IDENTITIES: dict[Any, tuple[Any, tuple[int, ...]]] = {
    aten.bitwise_and.Tensor: (True, (1, 0)), aten.__and__.Tensor: (True, (1, 0)),
    aten.logical_and.default: (True, (1, 0)),
}
_INPLACE_IDENTITIES: dict[Any, Any] = {
    aten.add_.Tensor: 0, aten.add_.Scalar: 0, aten.sub_.Tensor: 0, aten.sub_.Scalar: 0,
    aten.mul_.Tensor: 1, aten.mul_.Scalar: 1, aten.div_.Tensor: 1, aten.div_.Scalar: 1,
}
_SDPA = aten.scaled_dot_product_attention.default


@dataclass
class _Replacement(Match):
    """``node`` computes the value of ``survivor``; ``fresh``: ``node`` is a new tensor, not ``survivor`` itself."""

    node: fx.Node
    survivor: Any
    fresh: bool = True

    @property
    def root(self) -> fx.Node:
        return self.node


def _aliasing_problem(match: _Replacement) -> str | None:
    """Why ``match.node`` (a fresh tensor) cannot become ``match.survivor`` (which may be written), or None."""
    if not match.fresh:
        return None
    written = writers(match.node) + writers(match.survivor)
    if not written:
        return None
    return (f"'{written[0].name}' writes in place to '{match.node.name}' or '{match.survivor.name}'; "
            "replacing one by the other would let the write reach both")


class _SimplifyRule(Rule[_Replacement]):
    """Base of the rules below: the node becomes the survivor (the engine erases what that leaves dead)."""

    def __init__(self, max_constant_elements: int) -> None:
        self.max_constant_elements = max_constant_elements

    def constant_value(self, ctx: RewriteContext, node: Any) -> torch.Tensor | None:
        """``node``'s value if it is a small compile-time constant (evaluated once per walk), else None."""
        return ctx.constants.small_value(node, self.max_constant_elements)

    def rewrite(self, ctx: RewriteContext, match: _Replacement) -> fx.Node:
        return match.survivor


class _IdentityRule(_SimplifyRule):
    """``x op e`` where ``e`` is the identity element of ``op``  =>  ``x``."""

    name = "identity"
    stat = "identities"

    def _is_identity(self, ctx: RewriteContext, operand: Any, identity: Any) -> bool:
        if isinstance(operand, (bool, int, float)):
            return operand == identity
        value = self.constant_value(ctx, operand)
        return value is not None and value.numel() > 0 and bool((value == identity).all())

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _Replacement | None:
        if node.op != "call_function":
            return None
        target = node.target
        if target in _INPLACE_IDENTITIES:
            # x.add_(0) returns x itself, unchanged: exact, whatever aliases x.
            other = node.args[1] if len(node.args) > 1 else None
            if self._is_identity(ctx, other, _INPLACE_IDENTITIES[target]):
                return _Replacement(node, node.args[0], fresh=False)
            return None
        table = _IDENTITIES if target in _IDENTITIES else _BOOL_IDENTITIES
        if target not in table or len(node.args) < 2:
            return None
        if target in _BOOL_IDENTITIES and getattr(tensor_val(node), "dtype", None) is not torch.bool:
            return None
        identity, positions = table[target]
        candidates = [
            _Replacement(node, node.args[1 - pos]) for pos in positions
            if (pos == 1 or not has_argument(node, "alpha") or argument(node, "alpha") == 1)
            and self._is_identity(ctx, node.args[pos], identity)
        ]
        # the first candidate that can be applied; else the first, so its problem is reported
        return next((c for c in candidates if self._problem(c) is None), candidates[0] if candidates else None)

    @staticmethod
    def _problem(match: _Replacement) -> str | None:
        node, survivor = match.node, match.survivor
        if not isinstance(survivor, fx.Node):
            return "both operands are constants; fold-constants computes this"
        if not same_type(node, survivor):
            return f"the identity operand broadcasts '{survivor.name}' to a new shape or dtype"  # or casts it
        return _aliasing_problem(match)

    def check(self, ctx: RewriteContext, match: _Replacement) -> str | None:
        return self._problem(match)


class _SingleCatRule(_SimplifyRule):
    """``cat`` of one non-empty tensor (and empty ones)  =>  that tensor."""

    name = "single-cat"
    stat = "single_cats"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _Replacement | None:
        if node.op != "call_function" or node.target is not aten.cat.default:
            return None
        tensors = argument(node, "tensors")
        nonempty = [t for t in tensors if not (tensor_val(t) is not None and tensor_val(t).numel() == 0)]
        return _Replacement(node, nonempty[0]) if len(nonempty) == 1 else None

    def check(self, ctx: RewriteContext, match: _Replacement) -> str | None:
        if not same_type(match.node, match.survivor):
            return f"the concatenation has another shape or dtype than '{match.survivor.name}'"
        return _aliasing_problem(match)


class _FullSliceRule(_SimplifyRule):
    """A step-1 slice (or narrow) as long as its input along the sliced dim  =>  the input (both are views)."""

    name = "full-slice"
    stat = "full_slices"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _Replacement | None:
        if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.narrow.default):
            return None
        step = argument(node, "step") if node.target is aten.slice.Tensor else 1
        if step == 1 and same_type(node, node.args[0]):
            return _Replacement(node, node.args[0], fresh=False)
        return None


class _NoOpRule(NoOpRule):
    """remove-no-ops' rule (same-shape views, same-dtype casts, eval dropout), for recipes without it."""

    stat = "no_ops"


class _EmptyAttentionMaskRule(_SimplifyRule):
    """scaled_dot_product_attention with a constant mask that masks nothing  =>  no mask."""

    name = "empty-attention-mask"
    stat = "attention_masks_dropped"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _Replacement | None:
        if node.op != "call_function" or node.target is not _SDPA:
            return None
        mask = argument(node, "attn_mask")
        if not isinstance(mask, fx.Node) or tensor_val(mask) is None:
            return None
        value = self.constant_value(ctx, mask)
        if value is None:
            return None
        empty = bool(value.all()) if value.dtype is torch.bool else bool((value == 0).all())
        return _Replacement(node, mask) if empty else None

    def check(self, ctx: RewriteContext, match: _Replacement) -> str | None:
        q, k, mask = (tensor_val(v) for v in (match.node.args[0], match.node.args[1], match.survivor))
        if q is None or k is None:
            return "query or key has no recorded shape"
        scores = (*q.shape[:-1], k.shape[-2])
        try:
            if tuple(torch.broadcast_shapes(tuple(mask.shape), scores)) != tuple(scores):
                return "the mask broadcasts the attention scores to a larger shape; dropping it would change the output"
        except Exception:  # noqa: BLE001 - symbolic or incompatible shapes: keep the mask
            return "the mask's shape is symbolic or does not broadcast to the attention scores"
        return None

    def rewrite(self, ctx: RewriteContext, match: _Replacement) -> fx.Node:
        set_argument(match.node, "attn_mask", None)  # the engine erases the mask if nothing else reads it
        return match.node


@dataclass(frozen=True)
class SimplifyAlgebraOptions:
    drop_empty_attention_masks: bool = option(
        True, "drop scaled_dot_product_attention masks that mask nothing (all True, or all 0.0)")
    max_constant_elements: int = option(1 << 20, "largest constant operand inspected for identity values")
    include_no_ops: bool = option(
        False, "also apply remove-no-ops' rules (same-shape views, same-dtype casts, eval dropout); "
               "for recipes that do not run remove-no-ops")


@register
class SimplifyAlgebraPass(RewritePass):
    """Remove arithmetic that returns its input: x+0, x-0, x*1, x/1, x**1, b&True, x|0.

    Also single-input ``cat``, full slices and attention masks that mask nothing; with
    ``include_no_ops``, ``remove-no-ops``' rules too (same-shape views, same-dtype casts). An
    identity whose constant operand would broadcast ``x`` to another shape or dtype is kept.
    Permute chains are ``collapse-reshapes``' job.
    """

    name = "simplify-algebra"
    Options = SimplifyAlgebraOptions

    def rules(self) -> list[Rule]:
        options, limit = self.options, self.options.max_constant_elements
        return [_IdentityRule(limit), _SingleCatRule(limit), _FullSliceRule(limit),
                *([_NoOpRule()] if options.include_no_ops else []),
                *([_EmptyAttentionMaskRule(limit)] if options.drop_empty_attention_masks else [])]
