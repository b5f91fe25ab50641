"""The walk of the channel analysis: layouts per node, unifying them into coupled spaces, the visit loop."""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
from torch import fx

from fxcompress.analysis.arguments import argument
from fxcompress.analysis.channel_graph.model import ChannelGraph, Layout, ParamDim, SizeArg, layout_length, layout_spaces
from fxcompress.analysis.channel_graph.ops import _IGNORED, _SPLITS, _UNARY, _op_label
from fxcompress.analysis.shapes import tensor_shape

aten = torch.ops.aten


class Walk:
    """One topological walk over the graph: the layouts found so far, unification, the visit loop.

    The op handlers live in the mixins of :mod:`.layers`, :mod:`.shape_ops` and :mod:`.values`;
    :class:`~fxcompress.analysis.channel_graph.analysis.ChannelAnalysis` puts them together and
    says which handler reads which op (:meth:`handler`).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.cg = ChannelGraph()
        self.processed: set[fx.Node] = set()
        self.current: fx.Node | None = None
        self.roles: dict[tuple[str, int], tuple[str, str]] = {}

    # -- layouts --
    def get(self, node: Any) -> dict[int, Layout]:
        return self.cg.layouts.get(node.name, {}) if isinstance(node, fx.Node) else {}

    def set(self, node: fx.Node, layouts: dict[int, Layout]) -> None:
        layouts = {d: l for d, l in layouts.items() if l}
        if layouts:
            self.cg.layouts[node.name] = layouts

    def spaces_of(self, node: Any) -> set[int]:
        return set().union(*(layout_spaces(l) for l in self.get(node).values())) if self.get(node) else set()

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for inp in node.all_input_nodes:
            self.cg.block(self.spaces_of(inp), reason)

    # -- unification --
    def unify_pair(self, a: Layout, b: Layout, where: str) -> bool:
        if len(a) != len(b) or any(x.channels != y.channels or x.inner != y.inner or (x.space is None) != (y.space is None)
                                   for x, y in zip(a, b)):
            return False
        for x, y in zip(a, b):
            if x.space is not None:
                self.cg.couple(x.space, y.space, where)
        return True

    def adopt(self, node: fx.Node, dim: int, layout: Layout) -> bool:
        """Make untracked ``node``'s dimension ``dim`` follow ``layout``: only for parameters (and
        simple views of them) that no already-analysed op reads, so slicing them is safe."""
        if any(u in self.processed and u is not self.current for u in node.users):
            return False
        shape = tensor_shape(node)
        if shape is None or dim >= len(shape) or shape[dim] != layout_length(layout):
            return False
        existing = self.get(node).get(dim)
        if existing is not None:
            return self.unify_pair(existing, layout, node.name)
        if node.op == "get_attr":
            self.cg.layouts.setdefault(node.name, {})[dim] = layout
            return True
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        source = node.args[0]
        source_shape = tensor_shape(source)
        if source_shape is None:
            return False
        if node.target in _UNARY and source_shape == shape:
            back = dim
        elif node.target in (aten.expand.default, aten.unsqueeze.default):
            offset = len(shape) - len(source_shape)
            if node.target is aten.unsqueeze.default:
                where = argument(node, "dim") % len(shape)
                back = dim if dim < where else dim - 1
                if dim == where:
                    return False
            else:
                back = dim - offset
            if back < 0 or source_shape[back] != shape[dim]:
                return False
        else:
            return False
        saved = self.current
        self.current = node
        ok = self.adopt(source, back, layout)
        self.current = saved
        if ok:
            self.cg.layouts.setdefault(node.name, {})[dim] = layout
            if node.target is aten.expand.default:
                self.record_size_arg(node, 1, dim, layout)
        return ok

    def unify(self, entries: Sequence[tuple[Any, int]], where: fx.Node) -> Layout | None:
        """Require dims (node, dim) to be one index set; return the shared layout or None."""
        tracked = [(n, d, self.get(n).get(d)) for n, d in entries if isinstance(n, fx.Node)]
        ref = next((l for _, _, l in tracked if l is not None), None)
        if ref is None:
            return None
        involved = set().union(*(layout_spaces(l) for _, _, l in tracked))
        for n, d, layout in tracked:
            if layout is not None:
                if not self.unify_pair(ref, layout, where.name):
                    self.cg.block(involved, f"{_op_label(where)} '{where.name}' joins channel runs that do not line up")
                    return None
            else:
                shape = tensor_shape(n)
                if shape is None or d >= len(shape) or shape[d] == 1:
                    continue  # broadcast: no coupling
                if not self.adopt(n, d, ref):
                    self.cg.block(involved, f"channels meet the untracked tensor '{n.name}' at {_op_label(where)} "
                                            f"'{where.name}' (it cannot be sliced with them)")
                    return None
        return ref

    def record_param(self, node: Any, dim: int, role: str, user: fx.Node) -> None:
        """Note how ``user`` reads a parameter dimension (guides importance); slicing is decided
        at the end from the layouts every get_attr ended up with."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            self.roles.setdefault((node.name, dim), (role, user.name))

    def record_size_arg(self, node: fx.Node, arg: int, index: int | None, layout: Layout) -> None:
        value = node.args[arg] if arg < len(node.args) else None
        literal = value[index] if index is not None and isinstance(value, (list, tuple)) and index < len(value) else value
        if isinstance(literal, int) and not isinstance(literal, bool) and literal != -1:
            self.cg.size_args.append(SizeArg(node.name, arg, index, layout))

    # -- the walk --
    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            self.current = node
            if node.op == "output":
                for inp in node.all_input_nodes:
                    self.cg.block(self.spaces_of(inp), "reaches the model output (output shapes never change)")
            elif node.op == "call_function":
                self.visit(node)
            elif node.op in ("call_module", "call_method"):
                if node.target != "_guards_fn":
                    self.block_inputs(node, f"read by {node.op} '{node.target}', which the analysis does not look into")
            self.processed.add(node)
        # Every get_attr dimension that follows a layout must be sliced, however it got it.
        for node in self.gm.graph.nodes:
            if node.op != "get_attr":
                continue
            for dim, layout in sorted(self.get(node).items()):
                role, user = self.roles.get((node.name, dim), ("other", ""))
                self.cg.param_dims.append(ParamDim(node.target, dim, layout, role, user))
        return self.cg

    def visit(self, node: fx.Node) -> None:
        target = node.target
        if target in _IGNORED:
            return
        if target is operator.getitem:
            source, index = node.args
            if isinstance(source, fx.Node) and source.target in _SPLITS:
                self.set(node, dict(self.get(source)))
            else:
                self.block_inputs(node, f"getitem of {source} is not understood")
            return
        if not isinstance(target, torch._ops.OpOverload):
            self.block_inputs(node, f"read by {getattr(target, '__name__', target)}, which the analysis does not know")
            return
        handler = self.handler(target)
        if handler is None:
            if any(self.get(inp) for inp in node.all_input_nodes):
                self.block_inputs(node, f"read by {_op_label(node)} '{node.name}', which the analysis does not know")
            return
        handler(self, node)

    def handler(self, target: Any) -> Callable[[Any, fx.Node], None] | None:
        """The method that maps ``target``'s input layouts to its output's (None: unknown op)."""
        raise NotImplementedError
