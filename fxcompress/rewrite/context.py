"""The rewrite context: what a rule's ``check`` and ``rewrite`` work with.

It creates nodes and state with valid ``meta["val"]``, erases what a rewrite replaced (and the
dead subgraphs it leaves), and stamps provenance (:func:`fxcompress.graph_meta.stamp_provenance`)
so graph diffs can align old and new nodes. While a rule's ``rewrite`` runs, the context knows the
match (new nodes go before its root unless told otherwise) and records the nodes it creates, which
the engine stamps.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxcompress.analysis.aliasing import has_side_effects
from fxcompress.analysis.constant_eval import ConstantEvaluator
from fxcompress.analysis.attributes import add_attribute, attribute_owner, delete_attribute
from fxcompress.graph_meta import PROVENANCE_KEY, inherit_meta, stamp_provenance
from fxcompress.rewrite.matchers import (
    WeightedLayer, attribute, constant_tensor, describe_constant_problem, sharing_problem,
)


class RewriteContext:
    """What a rule's ``check`` and ``rewrite`` work with: the module, the pass name, and helpers."""

    def __init__(self, graph_module: fx.GraphModule, pass_name: str) -> None:
        self.graph_module = graph_module
        self.graph = graph_module.graph
        self.pass_name = pass_name
        self.erased: set[fx.Node] = set()
        #: targets of the state this context registered: private to this run, so deleting them
        #: when a later rewrite in the same run replaces them again is safe
        self.created: set[str] = set()
        self._storage_cache: dict[str, int | None] = {}
        self._fake_mode = next(
            (v.fake_mode for n in self.graph.nodes if hasattr(v := n.meta.get("val"), "fake_mode")), None
        )
        self._constants: ConstantEvaluator | None = None
        #: the match whose ``rewrite`` is running (None outside one), and the nodes it created
        self.match: Any = None
        self._created_nodes: list[fx.Node] = []

    def begin(self, match: Any) -> None:
        """The engine starts ``rewrite`` of ``match``: new nodes go before its root and are recorded."""
        self.match, self._created_nodes = match, []

    def end(self) -> list[fx.Node]:
        """The rewrite is over: the nodes it created through this context."""
        created, self.match, self._created_nodes = self._created_nodes, None, []
        return created

    def _before(self, before: fx.Node | None) -> fx.Node:
        if before is not None:
            return before
        if self.match is None:
            raise TypeError("give `before` (the node to insert before): no rewrite is running to default to")
        return self.match.root

    def _record(self, node: fx.Node) -> fx.Node:
        if self.match is not None:  # outside a rule's rewrite (a pass using the context directly) nobody asks
            self._created_nodes.append(node)
        return node

    @property
    def fake_mode(self) -> FakeTensorMode:
        """The fake mode of the graph's ``meta["val"]`` tensors (a fresh one if there are none).

        New values must come from the same mode: analyses that combine vals reject mixed modes.
        """
        if self._fake_mode is None:
            self._fake_mode = FakeTensorMode()
        return self._fake_mode

    @property
    def constants(self) -> ConstantEvaluator:
        """Which nodes are compile-time constants, and their values; computed once per context.

        The facts are those of the graph when first asked (see :class:`ConstantEvaluator`).
        """
        if self._constants is None:
            self._constants = ConstantEvaluator(self.graph_module)
        return self._constants

    def constant(self, value: Any) -> torch.Tensor | None:
        return constant_tensor(self.graph_module, value)

    def sharing_problem(self, value: Any, consumer: fx.Node, what: str) -> str | None:
        """:func:`sharing_problem` with a storage cache kept for this run (attributes are only added)."""
        return sharing_problem(self.graph_module, value, consumer, what, self._storage_cache)

    def weights_problem(self, layer: WeightedLayer) -> str | None:
        """Why ``layer``'s weight and bias cannot be replaced by rewritten copies (not constant, or
        read by another node too), or None."""
        what = layer.kind.replace("_", "-")
        for role, value in (("weight", layer.weight), ("bias", layer.bias)):
            reason = describe_constant_problem(self.graph_module, value, f"{what} {role}")
            reason = reason or self.sharing_problem(value, layer.node, f"{what} {role}")
            if reason:
                return reason
        return None

    def set_val(self, node: fx.Node, val: torch.Tensor) -> None:
        """Record ``val`` (a fake tensor of this graph's mode) as ``node``'s value and tensor metadata."""
        node.meta["val"] = val
        node.meta["tensor_meta"] = _extract_tensor_metadata(val)

    def new_constant(
        self, tensor: torch.Tensor, hint: str, before: fx.Node | None = None, replaced: list[fx.Node] | None = None,
        as_parameter: bool = False,
    ) -> fx.Node:
        """Store ``tensor`` on the root module and return a get_attr reading it, inserted before ``before``
        (default: the root of the match being rewritten).

        The attribute is named after ``hint`` (non-identifier characters replaced, made unique).
        ``as_parameter`` registers a floating-point tensor as an ``nn.Parameter`` (a folded weight
        stays a weight for fine-tuning); otherwise it is a persistent buffer. The node gets a fake
        ``val`` and is stamped as made from ``replaced`` (default: the match's nodes).
        """
        base = re.sub(r"\W", "_", hint).strip("_") or "constant"
        data = tensor.detach().clone(memory_format=torch.contiguous_format)
        parameter = as_parameter and data.is_floating_point()
        name = add_attribute(self.graph_module, base, data, parameter, requires_grad=True)
        with self.graph.inserting_before(self._before(before)):
            node = self.graph.get_attr(name)
        self.set_val(node, self.fake_mode.from_tensor(data, static_shapes=True))
        if replaced is None and self.match is not None:
            replaced = list(self.match.nodes)
        self.stamp(node, replaced or [])
        self.created.add(name)
        return self._record(node)

    def new_state(
        self, like: fx.Node, base: str, tensor: torch.Tensor, before: fx.Node | None = None, replaces: Any = None
    ) -> fx.Node:
        """Register ``tensor`` next to the state ``like`` reads and return a get_attr reading it.

        The new attribute lives in the module that owns ``like``'s tensor, named ``base`` made
        unique (``weight_fused``, ``weight_fused_1``, ...). It is a Parameter when ``like``'s tensor
        is one (fine-tuning keeps working), a buffer otherwise. The tensor is new, so layers sharing
        the old one are untouched. ``replaces`` (a node or None) goes into the provenance stamp.
        """
        owner_path = str(like.target).rpartition(".")[0]
        owner, old_name = attribute_owner(self.graph_module, str(like.target))
        old = getattr(owner, old_name)
        parameter = isinstance(old, nn.Parameter)
        name = add_attribute(owner, base, tensor.detach().contiguous(), parameter, parameter and old.requires_grad)
        target = f"{owner_path}.{name}" if owner_path else name
        with self.graph.inserting_before(self._before(before)):
            node = self.graph.get_attr(target)
        if self._fake_mode is not None:
            node.meta["val"] = self._fake_mode.from_tensor(attribute(self.graph_module, target), static_shapes=True)
        self.stamp(node, [replaces] if isinstance(replaces, fx.Node) else [])
        self.created.add(target)
        return self._record(node)

    def call(
        self, target: Any, args: tuple, like: fx.Node | None = None, before: fx.Node | None = None,
        kwargs: dict | None = None,
    ) -> fx.Node:
        """A new call of ``target`` before ``before``, carrying ``like``'s metadata (val, layer, trace).

        Inside a rewrite both default to the match's root. Our own annotations are not copied
        (:func:`fxcompress.graph_meta.inherit_meta`).
        """
        before = self._before(before)
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args, kwargs)
        inherit_meta(node, like if like is not None else self._before(None))  # the root, or a clear error
        return self._record(node)

    def stamp(self, node: fx.Node, replaced: list[fx.Node]) -> None:
        """Record in ``node.meta`` that this pass made ``node`` out of ``replaced`` (and what they came from)."""
        stamp_provenance(node, self.pass_name, replaced)

    @staticmethod
    def is_stamped(node: fx.Node) -> bool:
        """Whether ``node`` carries a provenance stamp (the engine keeps one a rule set itself)."""
        return PROVENANCE_KEY in node.meta

    def take_type(self, node: fx.Node, source: fx.Node) -> None:
        """Give ``node`` the result type of ``source`` (the node whose value it now computes)."""
        for key in ("val", "tensor_meta"):
            if key in source.meta:
                node.meta[key] = source.meta[key]

    def _drop_created(self, target: str) -> None:
        if any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
            return
        delete_attribute(self.graph_module, target)
        self.created.discard(target)
        self._storage_cache.pop(target, None)  # the name may be reused for a new tensor

    def erase(self, *nodes: fx.Node) -> None:
        """Erase replaced nodes once unused (consumers first), then the get_attrs they alone read.

        Unrelated dead code is left to ``eliminate-dead-code``; dropping the old parameters is
        also its job, which it can do because nothing reads them any more.
        """
        pending = list(nodes)
        progress = True
        while progress:  # repeat so the order of ``nodes`` does not matter
            progress = False
            for node in list(pending):
                if node in self.erased or node.users or node.op in ("placeholder", "output"):
                    continue
                inputs = [i for i in node.all_input_nodes if i.op == "get_attr"]
                self.graph.erase_node(node)
                self.erased.add(node)
                if node.op == "get_attr" and node.target in self.created:
                    self._drop_created(str(node.target))
                pending.remove(node)
                pending.extend(i for i in inputs if i not in pending)
                progress = True

    def erase_dead(self, candidates: Iterable[fx.Node] | None = None) -> int:
        """Erase ``candidates`` that are unused and side-effect free, then, transitively, the inputs
        that leaves unused; returns how many nodes went. ``None`` means every node of the graph.

        This is the one dead-code sweep: ``eliminate-dead-code`` runs it over the whole graph, and
        passes over the inputs of what they replaced. Unlike :meth:`erase`, it never removes a node
        with side effects (an in-place write, an assert, a random draw).
        """
        stack = list(self.graph.nodes) if candidates is None else list(candidates)
        removed = 0
        while stack:  # last first: erasing a consumer can free its producers, which are then retried
            node = stack.pop()
            if node in self.erased or node.users or has_side_effects(node):
                continue
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            self.erased.add(node)
            removed += 1
            if node.op == "get_attr" and node.target in self.created:
                self._drop_created(str(node.target))
            stack.extend(inputs)
        return removed
