"""The rewrite context: what a rule's ``check`` and ``rewrite`` work with.

It creates nodes and state with valid ``meta["val"]``, erases what a rewrite replaced, and stamps
provenance (``meta["fxcompress_provenance"]``) so graph diffs can align old and new nodes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxcompress.graph_meta import PROVENANCE_KEY
from fxcompress.rewrite.matchers import attribute, constant_tensor, sharing_problem


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

    def constant(self, value: Any) -> torch.Tensor | None:
        return constant_tensor(self.graph_module, value)

    def sharing_problem(self, value: Any, consumer: fx.Node, what: str) -> str | None:
        """:func:`sharing_problem` with a storage cache kept for this run (attributes are only added)."""
        return sharing_problem(self.graph_module, value, consumer, what, self._storage_cache)

    def new_state(
        self, like: fx.Node, base: str, tensor: torch.Tensor, before: fx.Node, replaces: Any = None
    ) -> fx.Node:
        """Register ``tensor`` next to the state ``like`` reads and return a get_attr reading it.

        The new attribute lives in the module that owns ``like``'s tensor, named ``base`` made
        unique (``weight_fused``, ``weight_fused_1``, ...). It is a Parameter when ``like``'s tensor
        is one (fine-tuning keeps working), a buffer otherwise. The tensor is new, so layers sharing
        the old one are untouched. ``replaces`` (a node or None) goes into the provenance stamp.
        """
        owner_path = str(like.target).rpartition(".")[0]
        owner = self.graph_module.get_submodule(owner_path) if owner_path else self.graph_module
        name, i = base, 1
        while hasattr(owner, name):
            name, i = f"{base}_{i}", i + 1
        old = attribute(self.graph_module, str(like.target))
        tensor = tensor.detach().contiguous()
        if isinstance(old, nn.Parameter):
            owner.register_parameter(name, nn.Parameter(tensor, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(name, tensor)
        target = f"{owner_path}.{name}" if owner_path else name
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(target)
        if self._fake_mode is not None:
            node.meta["val"] = self._fake_mode.from_tensor(attribute(self.graph_module, target), static_shapes=True)
        self.stamp(node, [replaces] if isinstance(replaces, fx.Node) else [])
        self.created.add(target)
        return node

    def call(self, target: Any, args: tuple, like: fx.Node, before: fx.Node) -> fx.Node:
        """A new call of ``target`` before ``before``, carrying ``like``'s metadata (val, layer, trace).

        Our own ``fxcompress_*`` annotations are not copied: they describe ``like``, not the new node.
        """
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args)
        node.meta.update({k: v for k, v in like.meta.items() if not k.startswith("fxcompress_")})
        return node

    def stamp(self, node: fx.Node, replaced: list[fx.Node]) -> None:
        """Record in ``node.meta`` that this pass made ``node`` out of ``replaced`` (and what they came from)."""
        sources: list[str] = []
        for old in replaced:
            earlier = old.meta.get(PROVENANCE_KEY, {}).get("from", [])
            for name in [*earlier, old.name]:
                if name not in sources:
                    sources.append(name)
        node.meta[PROVENANCE_KEY] = {"pass": self.pass_name, "from": sources}

    def take_type(self, node: fx.Node, source: fx.Node) -> None:
        """Give ``node`` the result type of ``source`` (the node whose value it now computes)."""
        for key in ("val", "tensor_meta"):
            if key in source.meta:
                node.meta[key] = source.meta[key]

    def _drop_created(self, target: str) -> None:
        if any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
            return
        owner_path, _, name = target.rpartition(".")
        delattr(self.graph_module.get_submodule(owner_path) if owner_path else self.graph_module, name)
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


