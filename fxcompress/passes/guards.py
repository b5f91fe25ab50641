"""remove-guards: drop the checks capture already proved, and resolve compile-time conditionals.

This pass is the one owner of guard and assert removal. Every rewrite is lossless: an assert
is dropped only when the captured types or constants prove it true, a shape expression only when
export resolved it to a plain number, and a ``torch.cond`` only when its predicate is a constant
(the taken branch is inlined, the other disappears). What a removal leaves unused is erased.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.analysis.constant_eval import ConstantEvaluator
from fxcompress.infra.pass_base import Pass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.rewrite import RewriteContext, argument, attribute, tensor_val

aten = torch.ops.aten

_SYM_TARGETS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}
_SYM_MODULES = {"_operator", "math"}
_ASSERT_SCALAR = {aten._assert_scalar.default}
_CONSTRAIN_RANGE = {aten.sym_constrain_range.default, aten.sym_constrain_range_for_size.default}
_ASSERT_ASYNC = {aten._assert_async.default, aten._assert_async.msg}


def _known_scalar(node: Any) -> tuple[bool, Any]:
    """(True, value) when ``node`` is a literal or a node export already resolved to a plain number."""
    if not isinstance(node, fx.Node):
        return True, node
    val = node.meta.get("val")
    if type(val) in (bool, int, float):
        return True, val
    if isinstance(val, torch.SymBool):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        if statically_known_true(val):
            return True, True
    return False, None


def _is_guards_module(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = graph_module.get_submodule(node.target)
    return node.target.startswith("_guards_fn") or type(module).__name__ == "GuardsFn"


def _metadata_assert_holds(node: fx.Node) -> bool:
    """``_assert_tensor_metadata`` whose checked dtype/device/layout the captured types already satisfy."""
    val = tensor_val(node.args[0]) if node.args else None
    if val is None:
        return False
    dtype, device, layout = (node.kwargs.get(k) for k in ("dtype", "device", "layout"))
    return (
        (dtype is None or dtype == val.dtype)
        and (device is None or torch.device(device).type == val.device.type)
        and (layout is None or layout == val.layout)
    )


def _drop_unreferenced_submodule(graph_module: fx.GraphModule, target: str) -> None:
    """Delete submodule ``target`` once no node of the graph calls or reads it."""
    if not any(n.op in ("call_module", "get_attr") and n.target == target for n in graph_module.graph.nodes):
        graph_module.delete_submodule(target)


def _substitute(user: fx.Node, old: fx.Node, value: Any) -> None:
    """Replace ``old`` by ``value`` (a Python literal) in ``user``'s arguments."""
    user.args = fx.node.map_arg(user.args, lambda n: value if n is old else n)
    user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is old else n)


@dataclass(frozen=True)
class RemoveGuardsOptions:
    keep_input_guards: bool = option(
        False, "keep export's _guards_fn (a Python check that inputs have the captured shapes; ONNX never carries it)")
    resolve_conditionals: bool = option(True, "inline torch.cond branches whose predicate is known at compile time")


@register
class RemoveGuardsPass(Pass):
    """Drop guards and asserts that capture already proved, and resolve compile-time conditionals.

    Removes export's ``_guards_fn`` input-shape check (the graph's static shapes encode the same
    contract), ``_assert_scalar``/``sym_constrain_range`` on facts known at capture,
    ``_assert_tensor_metadata`` the captured types satisfy, ``_assert_async`` on nonzero
    constants; replaces shape arithmetic (``sym_size``...) resolved to plain ints by the ints;
    inlines the taken branch of a ``torch.cond`` whose predicate is constant.
    """

    name = "remove-guards"
    Options = RemoveGuardsOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        ctx = RewriteContext(graph_module, self.name)
        constants: ConstantEvaluator | None = None  # built when first needed, again after each inlining
        stats = {"guards_removed": 0, "asserts_removed": 0, "scalars_resolved": 0, "conditionals_resolved": 0}
        rejections: list[Rejection] = []
        dead: list[fx.Node] = []
        for node in list(graph.nodes):
            if node in ctx.erased:
                continue
            if _is_guards_module(graph_module, node):
                if not self.options.keep_input_guards and not node.users:
                    dead.extend(node.all_input_nodes)
                    ctx.erase(node)
                    _drop_unreferenced_submodule(graph_module, str(node.target))
                    stats["guards_removed"] += 1
                continue
            if node.op != "call_function":
                continue
            if self._resolve_scalar(node):
                dead.append(node)
                stats["scalars_resolved"] += 1
                continue
            if node.target is torch.ops.higher_order.cond and self.options.resolve_conditionals:
                constants = constants or ConstantEvaluator(graph_module)
                reason = self._resolve_cond(ctx, constants, node, dead)
                if reason is None:
                    stats["conditionals_resolved"] += 1
                    constants = None  # the graph changed: constants must be recomputed
                else:
                    rejections.append(Rejection("resolve-cond", node.name, reason))
                continue
            if node.target in _ASSERT_ASYNC:
                constants = constants or ConstantEvaluator(graph_module)
            if self._assert_holds(constants, node, rejections):
                dead.extend(node.all_input_nodes)
                ctx.erase(node)
                stats["asserts_removed"] += 1
        ctx.erase_dead(dead)
        return PassResult(graph_module, any(stats.values()), stats, rejections)

    @staticmethod
    def _resolve_scalar(node: fx.Node) -> bool:
        """Replace a shape-arithmetic node whose value capture fixed by that plain number."""
        target = node.target
        if not (target in _SYM_TARGETS or getattr(target, "__module__", None) in _SYM_MODULES
                or getattr(target, "__name__", "").startswith("sym_")):
            return False
        val = node.meta.get("val")
        if type(val) not in (bool, int, float) or not node.users:
            return False
        for user in list(node.users):
            _substitute(user, node, val)
        return True

    @staticmethod
    def _assert_holds(constants: ConstantEvaluator | None, node: fx.Node, rejections: list[Rejection]) -> bool:
        target = node.target
        if target is aten._assert_tensor_metadata.default:
            return _metadata_assert_holds(node)
        if target in _ASSERT_SCALAR:
            known, value = _known_scalar(node.args[0] if node.args else None)
            if known and not value:
                rejections.append(Rejection("assert", node.name, "assertion is statically false: the model always fails here"))
            return known and bool(value)
        if target in _CONSTRAIN_RANGE:
            known, value = _known_scalar(node.args[0] if node.args else None)
            low, high = argument(node, "min"), argument(node, "max")
            return known and isinstance(value, int) and (low is None or value >= low) and (high is None or value <= high)
        if target in _ASSERT_ASYNC:
            value = constants.small_value(node.args[0], 1 << 16)
            return value is not None and bool(value.all())
        return False

    def _resolve_cond(
        self, ctx: RewriteContext, constants: ConstantEvaluator, node: fx.Node, dead: list[fx.Node]
    ) -> str | None:
        """Inline the taken branch of ``cond``; returns why not, or None when done."""
        if len(node.args) != 4 or not all(isinstance(a, fx.Node) for a in node.args[1:3]):
            return "unexpected cond signature"
        pred, true_attr, false_attr, operands = node.args
        known, value = _known_scalar(pred)
        if isinstance(pred, fx.Node) and not known:
            tensor = constants.small_value(pred, 1)
            if tensor is None:
                return "predicate depends on the inputs"
            known, value = True, bool(tensor.item())
        if not known:
            return "predicate is not known at compile time"
        graph_module, graph = ctx.graph_module, ctx.graph
        branch = attribute(graph_module, str((true_attr if value else false_attr).target))
        if not isinstance(branch, fx.GraphModule):
            return "branch is not a graph"
        body = list(branch.graph.nodes)
        if any(n.op not in ("placeholder", "call_function", "output") for n in body):
            return "branch reads module state or nests other control flow"
        placeholders = [n for n in body if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            return "branch arity does not match its operands"
        if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
            return "cond result is used as a whole, not per output"
        env: dict[fx.Node, Any] = dict(zip(placeholders, operands))
        outputs: Any = None
        with graph.inserting_before(node):
            for inner in body:
                if inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], env.__getitem__)
                elif inner.op == "call_function":
                    copied = graph.node_copy(inner, env.__getitem__)
                    ctx.stamp(copied, [node])
                    env[inner] = copied
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        getitems = list(node.users)
        for user in getitems:
            user.replace_all_uses_with(outputs[user.args[1]])
        dead.extend(node.all_input_nodes)
        ctx.erase(*getitems, node)  # and the branches' get_attrs, now unread
        for attr in (true_attr, false_attr):
            _drop_unreferenced_submodule(graph_module, str(attr.target))
        return None
