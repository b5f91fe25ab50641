"""Dead-branch pruning: guards, constant folding, algebraic identities, CSE and zero branches.

Every pass here is lossless: a rewrite replaces a value by one it provably equals.

- ``remove-guards``: export's ``_guards_fn`` input check, asserts the captured types already
  prove true, shape arithmetic export resolved to plain ints, and ``torch.cond`` whose predicate
  is known at compile time (the taken branch is inlined, the other one disappears).
- ``fold-constants``: a subgraph with no graph input in its ancestry computes the same tensor on
  every call, so it is run once here and its result stored as one buffer (``get_attr``).
  ``out_bytes <= max(always_fold_bytes, max_growth * bytes of the parameters it reads)`` bounds
  the size: an ``expand`` of a few numbers to an activation-sized tensor stays an ``expand``.
- ``simplify-algebra``: identities ``x+0 = x-0 = x*1 = x/1 = x`` (scalar or constant operand that
  does not broadcast ``x`` to a new shape or dtype), ``cat([x]) = x``, full slices, transposes
  and permutes that compose to the identity, same-shape views and same-dtype casts, and attention
  masks that mask nothing (all True / all 0: adding 0 to the scores).
- ``eliminate-common-subexpressions``: two pure ops with the same target and the same inputs
  compute the same value; the later one is replaced by the earlier.
- ``remove-zero-branches``: a conv/linear whose weight and bias are all zero outputs zeros; so do
  zero-preserving ops of zeros (relu, pooling, views...) and ``x * 0``. ``x + 0`` keeps ``x``.

Aliasing rules (fxcompress.analysis.aliasing): a value that some in-place op may write is never
folded, merged or swapped for another tensor; in-place ops, asserts and random ops are never
folded or merged. Nodes a rewrite leaves unused are erased here; parameters and buffers they
read are left unreferenced for ``eliminate-dead-code`` to drop.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxcompress.analysis.aliasing import (
    alias_set,
    has_side_effects,
    may_be_mutated,
    mutated_arg_positions,
    mutated_inputs,
)
from fxcompress.infra.pass_base import Pass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.passes.cleanup import _assert_is_static_true, _same_type, _val, no_op_source

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# Shared helpers: meta values, new nodes, dead-node pruning, constant evaluation
# ---------------------------------------------------------------------------------------------


def _fake_mode(graph_module: fx.GraphModule) -> FakeTensorMode:
    """The fake mode the graph's ``meta["val"]`` tensors live in (a fresh one if there are none).

    New values must come from the same mode: analyses that combine vals reject mixed modes.
    """
    for node in graph_module.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return FakeTensorMode()


def _set_val(node: fx.Node, val: torch.Tensor) -> None:
    node.meta["val"] = val
    node.meta["tensor_meta"] = _extract_tensor_metadata(val)


def _stamp(node: fx.Node, pass_name: str, sources: Iterable[fx.Node | str]) -> None:
    names = [s.name if isinstance(s, fx.Node) else str(s) for s in sources]
    node.meta["fxcompress_provenance"] = {"pass": pass_name, "from": names}


def _copy_layer_meta(new: fx.Node, old: fx.Node) -> None:
    """Keep the layer name (``nn_module_stack``) and source line of the node a new one replaces."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def _is_erased(node: fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_SDPA = {aten.scaled_dot_product_attention.default}


def _draws_no_random_numbers(node: fx.Node) -> bool:
    """A seeded-random op called so that it is deterministic: eval dropout, SDPA without dropout."""
    if node.target in _SDPA:
        return _arg(node, 4, "dropout_p", 0.0) == 0
    return no_op_source(node) is not None


def _side_effects(node: fx.Node) -> bool:
    """``has_side_effects``, except that deterministic calls of seeded-random ops are pure.

    torch tags SDPA and dropout ``nondeterministic_seeded`` whatever their arguments, so fx's
    purity check keeps an unused eval-mode attention block alive.
    """
    target = node.target
    if (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in target.tags and not mutated_arg_positions(node)
            and _draws_no_random_numbers(node)):
        return False
    return has_side_effects(node)


def _prune_dead(graph: fx.Graph, candidates: Iterable[fx.Node]) -> int:
    """Erase candidates (and, transitively, their inputs) that are unused and side-effect free."""
    stack, removed = list(candidates), 0
    while stack:
        node = stack.pop()
        if _is_erased(node) or node.users or node.op in ("placeholder", "output") or _side_effects(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        removed += 1
        stack.extend(inputs)
    return removed


def _attribute(root: torch.nn.Module, target: str) -> Any:
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return getattr(owner, name)


def _unique_attr_name(root: torch.nn.Module, hint: str) -> str:
    base = re.sub(r"\W", "_", hint).strip("_") or "constant"
    name, i = base, 1
    while hasattr(root, name):
        name, i = f"{base}_{i}", i + 1
    return name


def add_constant(
    graph_module: fx.GraphModule,
    tensor: torch.Tensor,
    hint: str,
    before: fx.Node,
    pass_name: str,
    sources: Iterable[fx.Node | str],
    as_parameter: bool = False,
) -> fx.Node:
    """Store ``tensor`` on the root module and insert a ``get_attr`` reading it before ``before``.

    ``as_parameter`` registers an ``nn.Parameter`` (a folded weight stays a weight for
    fine-tuning); otherwise a persistent buffer.
    """
    name = _unique_attr_name(graph_module, hint)
    data = tensor.detach().clone(memory_format=torch.contiguous_format)
    if as_parameter and data.is_floating_point():
        graph_module.register_parameter(name, torch.nn.Parameter(data))
    else:
        graph_module.register_buffer(name, data)
    with graph_module.graph.inserting_before(before):
        node = graph_module.graph.get_attr(name)
    _set_val(node, _fake_mode(graph_module).from_tensor(data, static_shapes=True))
    _stamp(node, pass_name, sources)
    return node


def _static_shape(val: Any) -> list[int] | None:
    if not isinstance(val, torch.Tensor) or not all(type(d) is int for d in val.shape):
        return None
    return list(val.shape)


def zeros_node(graph_module: fx.GraphModule, like: fx.Node, pass_name: str) -> fx.Node | None:
    """Insert ``aten.zeros`` of ``like``'s static shape/dtype/device before it; None if dynamic."""
    val = _val(like)
    shape = _static_shape(val)
    if shape is None:
        return None
    graph = graph_module.graph
    with graph.inserting_before(like):
        node = graph.call_function(
            aten.zeros.default, (shape,),
            {"dtype": val.dtype, "layout": torch.strided, "device": val.device, "pin_memory": False},
        )
    with _fake_mode(graph_module):
        _set_val(node, torch.zeros(shape, dtype=val.dtype, device=val.device))
    _copy_layer_meta(node, like)
    _stamp(node, pass_name, [like])
    return node


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_random(node: fx.Node) -> bool:
    """Seeded-random ops (rand, bernoulli, training dropout); eval-mode dropout is deterministic."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return torch.Tag.nondeterministic_seeded in target.tags and not _draws_no_random_numbers(node)


# Factories whose result is uninitialised memory: equal calls do not give equal values.
_UNINITIALISED = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                  aten.empty_strided.default, aten.new_empty_strided.default}


def _is_quantization(node: fx.Node) -> bool:
    """Fake-quantize / Q-DQ ops: exact to fold, but the exporter needs them to emit int8 Q/DQ."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.namespace in ("quantized_decomposed", "quant") or "fake_quantize" in target.name()


def _pure_call(node: fx.Node) -> bool:
    """A call_function whose value depends only on its arguments (no writes, asserts, RNG)."""
    if node.op != "call_function":
        return False
    if not (isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem):
        return False
    return node.target not in _UNINITIALISED and not _is_random(node) and not _side_effects(node)


class ConstantEvaluator:
    """Which nodes have no graph input in their ancestry, and their values (computed on demand).

    A ``get_attr`` of a tensor nobody writes is a constant; a pure call whose inputs are all
    constants is a constant unless its own result may be written in place later.
    """

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        self._values: dict[fx.Node, Any] = {}
        written = {n.target for n in graph_module.graph.nodes if n.op == "get_attr" and may_be_mutated(n)}
        self.constant: dict[fx.Node, bool] = {}
        for node in graph_module.graph.nodes:
            if node.op == "get_attr":
                try:
                    attribute = _attribute(graph_module, node.target)
                except AttributeError:
                    attribute = None
                self.constant[node] = node.target not in written and isinstance(attribute, torch.Tensor)
            elif node.op == "call_function":
                self.constant[node] = (
                    all(self.constant.get(i, False) for i in node.all_input_nodes)
                    and _pure_call(node)
                    and not _is_quantization(node)
                    and not may_be_mutated(node)
                )
            else:
                self.constant[node] = False

    def is_constant(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and self.constant.get(node, False)

    def cone(self, node: fx.Node) -> list[fx.Node]:
        """``node`` and its constant ancestors, in graph order."""
        seen, stack = {node}, [node]
        while stack:
            for inp in stack.pop().all_input_nodes:
                if inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return sorted(seen, key=self.order.__getitem__)

    def leaf_bytes(self, node: fx.Node) -> int:
        """Bytes of the parameters/buffers ``node`` is computed from."""
        return sum(_nbytes(_attribute(self.graph_module, n.target)) for n in self.cone(node) if n.op == "get_attr")

    def reads_parameter(self, node: fx.Node) -> bool:
        return any(n.op == "get_attr" and isinstance(_attribute(self.graph_module, n.target), torch.nn.Parameter)
                   for n in self.cone(node))

    def value(self, node: fx.Node) -> Any:
        """Run ``node``'s constant cone on the real parameters (raises if it is not constant)."""
        if not self.is_constant(node):
            raise ValueError(f"{node.name} depends on graph inputs")
        with torch.no_grad():
            for n in self.cone(node):
                if n in self._values:
                    continue
                if n.op == "get_attr":
                    self._values[n] = _attribute(self.graph_module, n.target)
                else:
                    args = fx.node.map_arg(n.args, self._values.__getitem__)
                    kwargs = fx.node.map_arg(n.kwargs, self._values.__getitem__)
                    self._values[n] = n.target(*args, **kwargs)
        return self._values[node]

    def small_value(self, node: Any, max_elements: int) -> torch.Tensor | None:
        """The tensor value of a constant node with at most ``max_elements`` elements, else None."""
        if not self.is_constant(node):
            return None
        val = _val(node)
        if isinstance(val, torch.Tensor) and val.numel() > max_elements:
            return None
        try:
            value = self.value(node)
        except Exception:  # noqa: BLE001 - an op that cannot run here is simply not simplified
            return None
        return value if isinstance(value, torch.Tensor) and value.numel() <= max_elements else None


def _substitute(user: fx.Node, old: fx.Node, value: Any) -> None:
    """Replace ``old`` by ``value`` (a node or a Python literal) in ``user``'s arguments."""
    user.args = fx.node.map_arg(user.args, lambda n: value if n is old else n)
    user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is old else n)


# ---------------------------------------------------------------------------------------------
# remove-guards
# ---------------------------------------------------------------------------------------------

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
        stats = {"guards_removed": 0, "asserts_removed": 0, "scalars_resolved": 0, "conditionals_resolved": 0}
        rejections: list[Rejection] = []
        evaluator: ConstantEvaluator | None = None
        dead: list[fx.Node] = []
        for node in list(graph.nodes):
            if _is_erased(node):
                continue
            if _is_guards_module(graph_module, node):
                if not self.options.keep_input_guards and not node.users:
                    target = node.target
                    dead.extend(node.all_input_nodes)
                    graph.erase_node(node)
                    if not any(n.op == "call_module" and n.target == target for n in graph.nodes):
                        graph_module.delete_submodule(target)
                    stats["guards_removed"] += 1
                continue
            if node.op != "call_function":
                continue
            if self._resolve_scalar(node):
                dead.append(node)
                stats["scalars_resolved"] += 1
                continue
            if node.target is torch.ops.higher_order.cond and self.options.resolve_conditionals:
                evaluator = evaluator or ConstantEvaluator(graph_module)
                reason = self._resolve_cond(graph_module, node, evaluator, dead)
                if reason is None:
                    stats["conditionals_resolved"] += 1
                    evaluator = None  # the graph changed: constants must be recomputed
                else:
                    rejections.append(Rejection("resolve-cond", node.name, reason))
                continue
            if self._assert_holds(graph_module, node, rejections):
                dead.extend(node.all_input_nodes)
                graph.erase_node(node)
                stats["asserts_removed"] += 1
        _prune_dead(graph, dead)
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
    def _assert_holds(graph_module: fx.GraphModule, node: fx.Node, rejections: list[Rejection]) -> bool:
        target = node.target
        if target is aten._assert_tensor_metadata.default:
            return _assert_is_static_true(node)
        if target in _ASSERT_SCALAR:
            known, value = _known_scalar(node.args[0] if node.args else None)
            if known and not value:
                rejections.append(Rejection("assert", node.name, "assertion is statically false: the model always fails here"))
            return known and bool(value)
        if target in _CONSTRAIN_RANGE:
            known, value = _known_scalar(node.args[0] if node.args else None)
            low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
            return known and isinstance(value, int) and (low is None or value >= low) and (high is None or value <= high)
        if target in _ASSERT_ASYNC:
            evaluator = ConstantEvaluator(graph_module)
            value = evaluator.small_value(node.args[0], 1 << 16)
            return value is not None and bool(value.all())
        return False

    def _resolve_cond(self, graph_module: fx.GraphModule, node: fx.Node, evaluator: ConstantEvaluator,
                      dead: list[fx.Node]) -> str | None:
        """Inline the taken branch of ``cond``; returns why not, or None when done."""
        if len(node.args) != 4 or not all(isinstance(a, fx.Node) for a in node.args[1:3]):
            return "unexpected cond signature"
        pred, true_attr, false_attr, operands = node.args
        known, value = _known_scalar(pred)
        if isinstance(pred, fx.Node) and not known:
            tensor = evaluator.small_value(pred, 1)
            if tensor is None:
                return "predicate depends on the inputs"
            known, value = True, bool(tensor.item())
        if not known:
            return "predicate is not known at compile time"
        branch_attr = true_attr if value else false_attr
        branch = _attribute(graph_module, branch_attr.target)
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
        graph = graph_module.graph
        with graph.inserting_before(node):
            for inner in body:
                if inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], env.__getitem__)
                elif inner.op == "call_function":
                    copied = graph.node_copy(inner, env.__getitem__)
                    _stamp(copied, self.name, [node])
                    env[inner] = copied
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        dead.extend(node.all_input_nodes)
        graph.erase_node(node)
        for attr in (true_attr, false_attr):
            if not attr.users:
                target = attr.target
                graph.erase_node(attr)
                if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                    graph_module.delete_submodule(target)
        return None


# ---------------------------------------------------------------------------------------------
# fold-constants
# ---------------------------------------------------------------------------------------------


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class FoldConstantsOptions:
    max_growth: float = option(4.0, "largest size ratio of a folded result to the parameters/buffers it is computed from")
    always_fold_bytes: int = option(65536, "results up to this many bytes are folded whatever their growth")
    fold_parameters: bool = option(
        True, "fold subgraphs that read parameters (e.g. weight transposes); the result is stored as a parameter")


@register
class FoldConstantsPass(Pass):
    """Compute subgraphs that depend only on parameters, buffers and constants once, at compile time.

    Each maximal constant subgraph feeding the rest of the graph becomes one buffer (a parameter
    when it is computed from parameters). Results much larger than what they are computed from
    (an ``expand`` to an activation-sized tensor) are not folded; the fold stops below them and
    ``growth_limited`` counts them. Random ops, in-place ops and tensors written in place are
    never folded; nor is a constant returned as a graph output (it would alias a module buffer),
    nor a fake-quantize op (the ONNX exporter turns it into the Q/DQ pair int8 kernels need).
    """

    name = "fold-constants"
    Options = FoldConstantsOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        evaluator = ConstantEvaluator(graph_module)
        is_const = evaluator.is_constant
        rejections: list[Rejection] = []
        queue = [n for n in graph.nodes if n.op == "call_function" and is_const(n)
                 and any(not is_const(u) for u in n.users)]
        planned: list[tuple[fx.Node, torch.Tensor]] = []
        seen: set[fx.Node] = set()
        growth_limited = 0
        while queue:
            node = queue.pop(0)
            if node in seen:
                continue
            seen.add(node)
            if any(u.op == "output" for u in node.users):
                rejections.append(Rejection(self.name, node.name, "a graph output: a folded buffer would be returned by reference"))
                continue
            if not self.options.fold_parameters and evaluator.reads_parameter(node):
                rejections.append(Rejection(self.name, node.name, "reads parameters and fold_parameters is off"))
                continue
            try:
                value = evaluator.value(node)
            except Exception as exc:  # noqa: BLE001 - an op that does not run eagerly is left in place
                rejections.append(Rejection(self.name, node.name, f"could not be evaluated: {type(exc).__name__}: {exc}"))
                continue
            if not isinstance(value, torch.Tensor):
                continue  # tuples (split) are folded through their getitem users
            size, leaves = _nbytes(value), evaluator.leaf_bytes(node)
            allowed = max(self.options.always_fold_bytes, self.options.max_growth * leaves)
            if size > allowed:
                growth_limited += 1
                rejections.append(Rejection(self.name, node.name, (
                    f"result {_format_bytes(size)} is more than {self.options.max_growth:g}x the "
                    f"{_format_bytes(leaves)} it is computed from (max_growth); its inputs are folded instead")))
                queue.extend(i for i in node.all_input_nodes if i.op == "call_function" and is_const(i))
                continue
            planned.append((node, value))
        folded, bytes_added, cone_nodes = 0, 0, []
        # Cones are read before any rewrite: folding one node puts its new get_attr into the
        # cone of a planned node it feeds, and that node is not in the evaluator's order map.
        rewrites = [(node, value, evaluator.cone(node), evaluator.reads_parameter(node)) for node, value in planned]
        # Equal results share one buffer when the first one is defined before the later use.
        stored: list[tuple[torch.Tensor, fx.Node, int]] = []
        for node, value, cone, as_parameter in rewrites:
            position = evaluator.order[node]
            attr = next((a for t, a, at in stored if at < position and t.dtype == value.dtype
                         and t.shape == value.shape and t.device == value.device and torch.equal(t, value)), None)
            if attr is None:
                attr = add_constant(
                    graph_module, value, f"folded_{node.name}", node, self.name,
                    [n for n in cone if n.op == "call_function"], as_parameter=as_parameter,
                )
                stored.append((value, attr, position))
                bytes_added += _nbytes(value)
            node.replace_all_uses_with(attr)
            cone_nodes.extend(cone)
            folded += 1
        removed = _prune_dead(graph, reversed(cone_nodes))
        stats = {"folded": folded, "nodes_removed": removed, "growth_limited": growth_limited, "bytes_added": bytes_added}
        return PassResult(graph_module, bool(folded), stats, rejections)


# ---------------------------------------------------------------------------------------------
# simplify-algebra
# ---------------------------------------------------------------------------------------------

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
_PERMUTES = {aten.transpose.int, aten.permute.default, aten.t.default}


def _permutation(node: fx.Node) -> list[int] | None:
    """The dimension order a transpose/permute/t node applies to its input, or None."""
    if node.op != "call_function" or node.target not in _PERMUTES:
        return None
    source = _val(node.args[0])
    if not isinstance(source, torch.Tensor):
        return None
    rank = source.dim()
    perm = list(range(rank))
    if node.target is aten.t.default:
        return perm[::-1] if rank == 2 else perm
    if node.target is aten.transpose.int:
        a, b = (d % rank if rank else 0 for d in node.args[1:3])
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    dims = [d % rank for d in node.args[1]]
    return dims if sorted(dims) == perm else None


def _safe_to_alias(node: fx.Node, source: fx.Node) -> bool:
    """Replacing ``node`` (a fresh tensor) by ``source`` is safe if no one writes either later."""
    return not may_be_mutated(node) and not may_be_mutated(source)


@dataclass(frozen=True)
class SimplifyAlgebraOptions:
    drop_empty_attention_masks: bool = option(
        True, "drop scaled_dot_product_attention masks that mask nothing (all True, or all 0.0)")
    max_constant_elements: int = option(1 << 20, "largest constant operand inspected for identity values")
    include_no_ops: bool = option(
        False, "also apply remove-no-ops' rules (same-shape views, same-dtype casts, eval dropout); "
               "for recipes that do not run remove-no-ops")


@register
class SimplifyAlgebraPass(Pass):
    """Remove arithmetic that returns its input: x+0, x-0, x*1, x/1, x**1, b&True, x|0.

    Also single-input ``cat``, full slices, transposes/permutes that compose to the identity
    (two that do not are merged into one permute) and attention masks that mask nothing; with
    ``include_no_ops``, ``remove-no-ops``' rules too (same-shape views, same-dtype casts). An
    identity whose constant operand would broadcast ``x`` to another shape or dtype is kept.
    """

    name = "simplify-algebra"
    Options = SimplifyAlgebraOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        evaluator = ConstantEvaluator(graph_module)
        stats = {"identities": 0, "single_cats": 0, "full_slices": 0, "permutes_cancelled": 0,
                 "permutes_merged": 0, "no_ops": 0, "attention_masks_dropped": 0}
        dead: list[fx.Node] = []
        for node in list(graph.nodes):
            if _is_erased(node) or node.op != "call_function":
                continue
            if node.target in _SDPA:
                if self.options.drop_empty_attention_masks and self._drop_mask(node, evaluator, dead):
                    stats["attention_masks_dropped"] += 1
                continue
            rule, replacement = self._rewrite(graph_module, node, evaluator)
            if replacement is None:
                continue
            node.replace_all_uses_with(replacement)
            dead.extend(node.all_input_nodes)
            graph.erase_node(node)
            stats[rule] += 1
        _prune_dead(graph, dead)
        return PassResult(graph_module, any(stats.values()), stats)

    def _rewrite(self, graph_module: fx.GraphModule, node: fx.Node,
                 evaluator: ConstantEvaluator) -> tuple[str, fx.Node | None]:
        target = node.target
        if target in _INPLACE_IDENTITIES:
            # x.add_(0) returns x itself, unchanged: exact, whatever aliases x.
            other = node.args[1] if len(node.args) > 1 else None
            if self._is_identity(other, _INPLACE_IDENTITIES[target], evaluator) and _same_type(node, node.args[0]):
                return "identities", node.args[0]
            return "identities", None
        table = _IDENTITIES if target in _IDENTITIES else _BOOL_IDENTITIES
        if target in table:
            if target in _BOOL_IDENTITIES and getattr(_val(node), "dtype", None) is not torch.bool:
                return "identities", None
            identity, positions = table[target]
            for pos in positions:
                if pos == 0 and _arg(node, 2, "alpha", 1) != 1:
                    continue
                if len(node.args) < 2 or not self._is_identity(node.args[pos], identity, evaluator):
                    continue
                survivor = node.args[1 - pos]
                if isinstance(survivor, fx.Node) and _same_type(node, survivor) and _safe_to_alias(node, survivor):
                    return "identities", survivor
            return "identities", None
        if target is aten.cat.default:
            tensors = node.args[0]
            nonempty = [t for t in tensors if not (isinstance(_val(t), torch.Tensor) and _val(t).numel() == 0)]
            if len(nonempty) == 1 and _same_type(node, nonempty[0]) and _safe_to_alias(node, nonempty[0]):
                return "single_cats", nonempty[0]
            return "single_cats", None
        if target in (aten.slice.Tensor, aten.narrow.default):
            # A step-1 slice as long as its input along the sliced dim covers all of it (a view).
            step = _arg(node, 4, "step", 1) if target is aten.slice.Tensor else 1
            if step == 1 and _same_type(node, node.args[0]):
                return "full_slices", node.args[0]
            return "full_slices", None
        perm = _permutation(node)
        if perm is not None:
            return self._compose_permutes(graph_module, node, perm)
        return "no_ops", no_op_source(node) if self.options.include_no_ops else None

    def _is_identity(self, operand: Any, identity: Any, evaluator: ConstantEvaluator) -> bool:
        if isinstance(operand, (bool, int, float)):
            return operand == identity
        value = evaluator.small_value(operand, self.options.max_constant_elements)
        return value is not None and value.numel() > 0 and bool((value == identity).all())

    def _compose_permutes(self, graph_module: fx.GraphModule, node: fx.Node, perm: list[int]) -> tuple[str, fx.Node | None]:
        if perm == sorted(perm):
            return "permutes_cancelled", node.args[0]  # transpose(x, d, d), permute(x, [0, 1, ...])
        inner = node.args[0]
        inner_perm = _permutation(inner) if isinstance(inner, fx.Node) else None
        if inner_perm is None or len(inner_perm) != len(perm):
            return "permutes_cancelled", None
        composed = [inner_perm[p] for p in perm]
        source = inner.args[0]
        if composed == sorted(composed):
            return "permutes_cancelled", source  # both are views: aliasing is unchanged
        if len(inner.users) != 1:
            return "permutes_merged", None
        with graph_module.graph.inserting_before(node):
            merged = graph_module.graph.call_function(aten.permute.default, (source, composed))
        merged.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        _copy_layer_meta(merged, node)
        _stamp(merged, self.name, [inner, node])
        return "permutes_merged", merged

    def _drop_mask(self, node: fx.Node, evaluator: ConstantEvaluator, dead: list[fx.Node]) -> bool:
        mask = _arg(node, 3, "attn_mask")
        if not isinstance(mask, fx.Node):
            return False
        q, k = _val(node.args[0]), _val(node.args[1])
        mask_val = _val(mask)
        if not all(isinstance(v, torch.Tensor) for v in (q, k, mask_val)):
            return False
        scores = (*q.shape[:-1], k.shape[-2])
        try:
            if tuple(torch.broadcast_shapes(tuple(mask_val.shape), scores)) != tuple(scores):
                return False
        except Exception:  # noqa: BLE001 - symbolic or incompatible shapes: keep the mask
            return False
        value = evaluator.small_value(mask, self.options.max_constant_elements)
        if value is None:
            return False
        empty = bool(value.all()) if value.dtype is torch.bool else bool((value == 0).all())
        if not empty:
            return False
        if len(node.args) > 3:
            node.args = (*node.args[:3], None, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": None}
        dead.append(mask)
        return True


# ---------------------------------------------------------------------------------------------
# eliminate-common-subexpressions
# ---------------------------------------------------------------------------------------------

_COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}


def _normalize(value: Any) -> Any:
    """A hashable key for an argument; types are kept (1, 1.0 and True give different dtypes)."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_normalize(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _normalize(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", repr(value))  # keeps -0.0 apart from 0.0 and makes nan equal to nan
    return (type(value).__name__, value)


@dataclass(frozen=True)
class EliminateCommonSubexpressionsOptions:
    commutative: bool = option(True, "treat add(a, b) and add(b, a) (also mul) as the same expression")


@register
class EliminateCommonSubexpressionsPass(Pass):
    """Merge identical pure ops on identical inputs (and repeated reads of one attribute).

    Never merged: in-place ops, asserts, random ops, uninitialised factories, results some
    in-place op may write later, and ops reading a tensor that is written in place anywhere
    (two reads around the write would see different values).
    """

    name = "eliminate-common-subexpressions"
    Options = EliminateCommonSubexpressionsOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        written: dict[fx.Node, bool] = {}

        def is_written(n: fx.Node) -> bool:
            if n not in written:
                written[n] = may_be_mutated(n)
            return written[n]

        seen: dict[Any, fx.Node] = {}
        merged = 0
        for node in list(graph.nodes):
            if node.op == "get_attr":
                key: Any = ("get_attr", node.target)
            elif _pure_call(node) and not is_written(node) and not any(is_written(i) for i in node.all_input_nodes):
                args = node.args
                if self.options.commutative and node.target in _COMMUTATIVE and len(args) == 2 and \
                        all(isinstance(a, fx.Node) for a in args) and not node.kwargs:
                    args = tuple(sorted(args, key=order.__getitem__))
                key = (node.target, _normalize(args), _normalize(node.kwargs))
            else:
                continue
            try:
                earlier = seen.setdefault(key, node)
            except TypeError:  # an unhashable literal argument: leave the node alone
                continue
            if earlier is not node:
                node.replace_all_uses_with(earlier)
                graph.erase_node(node)
                merged += 1
        return PassResult(graph_module, bool(merged), {"merged": merged})


# ---------------------------------------------------------------------------------------------
# remove-zero-branches
# ---------------------------------------------------------------------------------------------

_ZERO_FACTORIES = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
_FILL_FACTORIES = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2,
                   aten.scalar_tensor.default: 0}
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
# (input, weight, bias) positions: zero when input or weight is zero and the bias is absent or zero.
_WEIGHTED = {
    aten.linear.default: (0, 1, 2), aten.conv1d.default: (0, 1, 2), aten.conv2d.default: (0, 1, 2),
    aten.conv3d.default: (0, 1, 2), aten.convolution.default: (0, 1, 2),
    aten.conv_transpose1d.default: (0, 1, 2), aten.conv_transpose2d.input: (0, 1, 2),
    aten.conv_transpose3d.input: (0, 1, 2),
}
_PRODUCTS = {aten.mm.default, aten.bmm.default, aten.matmul.default}
_IN_PLACE_ABSORB = {aten.add_.Tensor, aten.sub_.Tensor}
_ABSORB = {aten.add.Tensor: (1, 0), aten.sub.Tensor: (1,)}


@dataclass(frozen=True)
class RemoveZeroBranchesOptions:
    multiply_by_zero: bool = option(
        True, "treat x * 0 as 0 (IEEE gives NaN when x is inf or NaN; lossless for finite activations)")


@register
class RemoveZeroBranchesPass(Pass):
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

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        zero = self._zero_nodes(graph_module)
        stats = {"zero_branches": 0, "absorbed": 0}
        rejections: list[Rejection] = []
        dead: list[fx.Node] = []
        for node in list(graph.nodes):
            if _is_erased(node) or node.op != "call_function" or zero.get(node):
                continue
            survivor = self._absorb(graph_module, node, zero, rejections)
            if survivor is not None:
                node.replace_all_uses_with(survivor)
                dead.extend(node.all_input_nodes)
                graph.erase_node(node)
                stats["absorbed"] += 1
        for node in list(graph.nodes):
            if _is_erased(node) or not zero.get(node) or node.op != "call_function":
                continue
            if node.target in _ZERO_FACTORIES or not any(not zero.get(u) for u in node.users):
                continue
            replacement = zeros_node(graph_module, node, self.name)
            if replacement is None:
                rejections.append(Rejection(self.name, node.name, "all zero, but its shape is dynamic"))
                continue
            zero[replacement] = True
            for user in list(node.users):
                if user is not replacement and not zero.get(user):
                    _substitute(user, node, replacement)
            dead.append(node)
            stats["zero_branches"] += 1
        _prune_dead(graph, dead)
        while self._drop_dead_zero_writes(graph, zero):
            pass
        return PassResult(graph_module, any(stats.values()), stats, rejections)

    def _zero_nodes(self, graph_module: fx.GraphModule) -> dict[fx.Node, bool]:
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
                    t = _attribute(graph_module, node.target)
                    all_zero_attr[node.target] = isinstance(t, torch.Tensor) and t.numel() > 0 and not bool(t.any())
                zero[node] = all_zero_attr[node.target] and not may_be_mutated(node)
                continue
            if node.op != "call_function":
                continue
            zero[node] = self._computes_zero(node, z) and self._writes_keep_zero(node, z)
        return zero

    def _computes_zero(self, node: fx.Node, z: Callable[[Any], bool]) -> bool:
        target, args = node.target, node.args
        if not isinstance(_val(node), torch.Tensor):
            return False
        if target in _ZERO_FACTORIES:
            return True
        if target in _FILL_FACTORIES:
            return z(_arg(node, _FILL_FACTORIES[target], "fill_value"))
        if target in _ZERO_PRESERVING:
            return z(args[0]) and (target is not aten.dropout.default or no_op_source(node) is not None)
        if target in _HARDTANH:
            low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
            return z(args[0]) and low <= 0 <= high
        if target in _WEIGHTED:
            i, w, b = _WEIGHTED[target]
            bias = _arg(node, b, "bias")
            return (z(args[i]) or z(args[w])) and (bias is None or z(bias))
        if target in _PRODUCTS:
            return z(args[0]) or z(args[1])
        if target is aten.addmm.default:
            beta = _arg(node, 3, "beta", 1)
            return (z(args[0]) or beta == 0) and (z(args[1]) or z(args[2]))
        if target in (aten.mul.Tensor, aten.mul.Scalar):
            return self.options.multiply_by_zero and (z(args[0]) or z(args[1]))
        if target in (aten.add.Tensor, aten.sub.Tensor):
            return z(args[0]) and z(args[1])
        if target is aten.cat.default:
            return all(z(t) for t in args[0])
        return False

    @staticmethod
    def _writes_keep_zero(node: fx.Node, z: Callable[[Any], bool]) -> bool:
        """A zero stays zero if every in-place write to it is zero-preserving (relu_ of it)."""
        for member in alias_set(node):
            for user in member.users:
                if member not in mutated_inputs(user):
                    continue
                if user.target in _ZERO_PRESERVING or user.target in _HARDTANH:
                    continue
                if user.target in _IN_PLACE_ABSORB and len(member.users) == 1:
                    continue  # zero += x: the only reader is the write itself (see _absorb)
                return False
        return True

    def _absorb(self, graph_module: fx.GraphModule, node: fx.Node, zero: dict[fx.Node, bool],
                rejections: list[Rejection]) -> fx.Node | None:
        """The tensor ``x`` that ``x + 0`` / ``x - 0`` / ``0 + x`` (in place or not) equals, or None."""
        target = node.target
        if target in _IN_PLACE_ABSORB:
            self_arg, other = node.args[0], node.args[1]
            if zero.get(other) and _same_type(node, self_arg):
                return self_arg  # x += 0 leaves x (and returns it) unchanged
            if target is aten.add_.Tensor and zero.get(self_arg) and isinstance(other, fx.Node) and \
                    _arg(node, 2, "alpha", 1) == 1 and _same_type(node, other):
                # zero += x gives a fresh copy of x: x itself if nobody writes either, else a copy.
                if _safe_to_alias(node, other):
                    return other
                return self._copy_of(graph_module, node, other)
            return None
        if target not in _ABSORB or len(node.args) < 2:
            return None
        for pos in _ABSORB[target]:
            if pos == 0 and _arg(node, 2, "alpha", 1) != 1:
                continue
            survivor = node.args[1 - pos]
            if not zero.get(node.args[pos]) or not isinstance(survivor, fx.Node) or not _same_type(node, survivor):
                continue
            if _safe_to_alias(node, survivor):
                return survivor
            return self._copy_of(graph_module, node, survivor)
        return None

    def _copy_of(self, graph_module: fx.GraphModule, node: fx.Node, source: fx.Node) -> fx.Node | None:
        """``clone(source)`` in the memory format ``node`` had; None if that format is unusual."""
        val = _val(node)
        if val.is_contiguous():
            fmt = torch.contiguous_format
        elif val.dim() == 4 and val.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last
        else:
            return None
        with graph_module.graph.inserting_before(node):
            copy = graph_module.graph.call_function(aten.clone.default, (source,), {"memory_format": fmt})
        copy.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        _copy_layer_meta(copy, node)
        _stamp(copy, self.name, [node])
        return copy

    @staticmethod
    def _drop_dead_zero_writes(graph: fx.Graph, zero: dict[fx.Node, bool]) -> int:
        """Erase unused zero-preserving in-place ops on zeros (relu_ of zero writes zero), then
        what they alone used; returns how many in-place ops went."""
        dropped = 0
        for node in reversed(list(graph.nodes)):
            if _is_erased(node) or node.users or not zero.get(node) or not mutated_inputs(node):
                continue
            inputs = node.all_input_nodes
            graph.erase_node(node)
            _prune_dead(graph, inputs)
            dropped += 1
        return dropped


__all__ = [
    "ConstantEvaluator", "EliminateCommonSubexpressionsPass", "FoldConstantsPass", "RemoveGuardsPass",
    "RemoveZeroBranchesPass", "SimplifyAlgebraPass", "add_constant", "zeros_node",
]
