"""Cleanup: dead-code elimination and removal of no-op nodes.

Both passes are lossless by construction: they only delete nodes whose value is unused and that
have no side effects, or replace a node by an input it provably equals (same shape, same dtype,
eval-mode dropout). Tensors that may be mutated in place are never merged with their copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.analysis.aliasing import inactive_dropout, may_be_mutated
from fxcompress.analysis.attributes import delete_attribute
from fxcompress.infra.pass_base import Pass, PassResult, option
from fxcompress.infra.registry import register
from fxcompress.rewrite import Match, RewriteContext, RewritePass, Rule, same_type, tensor_val

aten = torch.ops.aten


def drop_unused_state(graph_module: fx.GraphModule) -> int:
    """Delete parameters and buffers no get_attr node reads; returns how many were dropped."""
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    unused = [name for name, _ in graph_module.named_parameters() if name not in used]
    unused += [name for name, _ in graph_module.named_buffers() if name not in used]
    for name in unused:
        delete_attribute(graph_module, name)
    graph_module.delete_all_unused_submodules()
    return len(unused)


@dataclass(frozen=True)
class EliminateDeadCodeOptions:
    drop_unused_state: bool = option(True, "also delete parameters/buffers nothing reads (the state_dict shrinks)")


@register
class EliminateDeadCodePass(Pass):
    """Remove nodes whose results are unused and that have no side effects.

    In-place ops (``relu_``, ``add_``), asserts, random draws and module calls are side effects
    and are kept; unused parameters and buffers are dropped from the module.
    """

    name = "eliminate-dead-code"
    Options = EliminateDeadCodeOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        removed = RewriteContext(graph_module, self.name).erase_dead()
        dropped = drop_unused_state(graph_module) if self.options.drop_unused_state else 0
        return PassResult(graph_module, bool(removed or dropped), {"removed": removed, "state_dropped": dropped})


# Ops that return their input itself (or a view of it) when the result type is unchanged.
_ALIAS_WHEN_SAME = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                    aten.flatten.using_ints, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                    aten.type_as.default, aten.view_as.default, aten.reshape_as.default, aten.expand_as.default,
                    aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.alias.default}
# Ops that return a fresh copy: replaceable only when nobody mutates either tensor afterwards.
_COPY_WHEN_SAME = {aten._to_copy.default, aten.clone.default, aten.contiguous.default}


def no_op_source(node: fx.Node) -> fx.Node | None:
    """The input ``node`` provably equals, or None if ``node`` does real work."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    target = node.target
    if inactive_dropout(node):
        return source
    if target in _ALIAS_WHEN_SAME and same_type(node, source):
        return source
    if target in _COPY_WHEN_SAME and same_type(node, source):
        if target is aten.contiguous.default and not tensor_val(source).is_contiguous():
            return None
        if not may_be_mutated(node) and not may_be_mutated(source):
            return source
    return None


class NoOpRule(Rule[Match]):
    """A node that computes nothing (:func:`no_op_source`)  =>  the input it equals."""

    name = "no-op"
    stat = "removed"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> Match | None:
        source = no_op_source(node)
        return Match(node, source=source) if source is not None else None

    def rewrite(self, ctx: RewriteContext, match: Match) -> fx.Node:
        return match.source


@register
class RemoveNoOpsPass(RewritePass):
    """Replace nodes that compute nothing by their input.

    Eval-mode dropout, same-shape view/reshape/expand/flatten, same-dtype casts and copies nobody
    mutates. (Asserts the captured types prove true are ``remove-guards``' job.)
    """

    name = "remove-no-ops"

    def rules(self) -> list[Rule]:
        return [NoOpRule()]
