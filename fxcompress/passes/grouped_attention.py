"""fold-repeat-kv: grouped-query attention reads its shared key/value heads directly.

Models with fewer key/value heads than query heads (Llama 2/3, Qwen2, Mistral: grouped-query
attention) copy each key and value head ``group`` times before attention (transformers'
``repeat_kv``: ``unsqueeze(2) -> expand -> reshape``). At decode time that copy is the whole KV
cache, twice per layer and step. ``scaled_dot_product_attention(..., enable_gqa=True)`` computes
the same attention from the unrepeated heads (query head ``h`` reads key/value head
``h // group``, which is the order ``repeat_kv`` lays the copies out in), and at ONNX opset 23
exports as one ``Attention`` node that reads the shared heads itself.

Lossless: the attention reads the same values. Both key and value must be repeated the same
number of times, and the repeated tensors read by nothing else (otherwise they are computed anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxcompress.infra.registry import register
from fxcompress.rewrite import Match, Rule, RewriteContext, RewritePass, argument, is_call, set_argument, tensor_val

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


def _same(a: Any, b: Any) -> bool:
    """Sizes equal for every value of their symbols (never guesses on symbolic ones)."""
    return a is b or bool(statically_known_true(a == b))


@dataclass
class _Repeat:
    """``repeated = reshape(expand(unsqueeze(heads, 2)))``: each head of ``heads`` ``group`` times."""

    heads: fx.Node
    group: int
    nodes: list[fx.Node]


def _repeat(node: Any) -> _Repeat | None:
    """The repeat_kv chain ending at ``node``, if it is one (on 4-D ``[batch, heads, seq, dim]``)."""
    if not is_call(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    if not is_call(expand, aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not is_call(unsqueeze, aten.unsqueeze.default) or unsqueeze.args[1] not in (2, -3):
        return None
    heads, expanded, repeated = (tensor_val(n) for n in (unsqueeze.args[0], expand, node))
    if heads is None or expanded is None or repeated is None or heads.dim() != 4 or expanded.dim() != 5:
        return None
    group = expanded.shape[2]
    if not isinstance(group, int) or group < 2 or not isinstance(heads.shape[1], int):
        return None
    b, h, s, d = heads.shape
    if not all(_same(x, y) for x, y in zip(expanded.shape, (b, h, group, s, d))):
        return None
    if repeated.dim() != 4 or not all(_same(x, y) for x, y in zip(repeated.shape, (b, h * group, s, d))):
        return None
    return _Repeat(unsqueeze.args[0], group, [node, expand, unsqueeze])


@dataclass
class _GroupedAttention(Match):
    attention: fx.Node
    key: _Repeat
    value: _Repeat

    @property
    def root(self) -> fx.Node:
        return self.attention

    @property
    def nodes(self) -> list[fx.Node]:
        return list(dict.fromkeys([self.attention, *self.key.nodes, *self.value.nodes]))


class _FoldRepeatKvRule(Rule[_GroupedAttention]):
    name = "repeat-kv"
    stat = "attentions_grouped"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _GroupedAttention | None:
        if not is_call(node, _SDPA) or argument(node, "enable_gqa"):
            return None
        key, value = _repeat(argument(node, "key")), _repeat(argument(node, "value"))
        return _GroupedAttention(node, key, value) if key is not None and value is not None else None

    def check(self, ctx: RewriteContext, match: _GroupedAttention) -> str | None:
        if match.key.group != match.value.group:
            return f"key heads are repeated {match.key.group} times but value heads {match.value.group} times"
        shared = [n.name for n in match.key.nodes + match.value.nodes if len(n.users) > 1]
        if shared:
            return f"the repeated heads ('{shared[0]}') are also read elsewhere: the copy would still be made"
        query = tensor_val(argument(match.attention, "query"))
        key = tensor_val(match.key.heads)
        if query is None or query.dim() != 4 or not _same(query.shape[1], key.shape[1] * match.key.group):
            return "the query's head count is not the key's times the repeat (or is not recorded)"
        return None

    def rewrite(self, ctx: RewriteContext, match: _GroupedAttention) -> fx.Node:
        node = match.attention
        grouped = ctx.call(_SDPA, node.args, kwargs=dict(node.kwargs))
        for name, value in (("key", match.key.heads), ("value", match.value.heads), ("enable_gqa", True)):
            set_argument(grouped, name, value)
        return grouped


@register
class FoldRepeatKvPass(RewritePass):
    """Grouped-query attention that copies its key/value heads (``repeat_kv``) reads them directly
    instead (``scaled_dot_product_attention(enable_gqa=True)``); lossless."""

    name = "fold-repeat-kv"

    def rules(self) -> list[Rule]:
        return [_FoldRepeatKvRule()]
