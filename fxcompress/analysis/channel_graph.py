"""Channel dependency analysis for structured pruning, as an explicit networkx graph.

Removing output channel ``c`` of a convolution is only safe if the same channel is removed at
once from every tensor that indexes it: the batch norm after it, the next convolution's input
channels, the other branch of a residual add, the slice of a concatenation that holds it, the
``c * H * W`` block of a linear layer after a flatten. This module finds those couplings.

Model
-----
A **channel space** is an index set created by a producer (the output channels of a conv or
linear layer, the embedding width of an embedding table). Every tracked tensor dimension has a
**layout**: a tuple of :class:`Segment` (space, channels, inner block), read left to right, so
a concatenation is several segments and a flatten of ``[N, C, H, W]`` is one segment of ``C``
channels each ``H * W`` elements wide. Walking the graph once in topological order, each op maps
its inputs' layouts to its output's; where an op forces two layouts to be the same index set
(both sides of an add, a batch norm's parameters, a linear weight's input dimension) the spaces
are joined by an edge of :attr:`ChannelGraph.graph`. The connected components of that graph are
the **groups** that must be pruned together.

A group is refused, with a reason, when any of its channels reaches the model's output (output
shapes never change), feeds an op the analysis does not understand, is split by a reshape (e.g.
attention heads), selected or sliced individually, used by a non-depthwise grouped convolution,
or meets a computed tensor it cannot be sliced together with. Everything else may be pruned; the
parameters and size arguments that must change are listed per group.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
from torch import fx

from fxcompress.analysis.arguments import argument
from fxcompress.analysis.shapes import concrete_size, numel, tensor_shape
from fxcompress.graph_meta import layer_name

aten = torch.ops.aten


@dataclass(frozen=True)
class Segment:
    """``channels`` channels of ``space`` (None: a fixed, unprunable run), each ``inner`` elements wide."""

    space: int | None
    channels: int
    inner: int = 1

    @property
    def length(self) -> int:
        return self.channels * self.inner


Layout = tuple[Segment, ...]


def layout_length(layout: Layout) -> int:
    return sum(s.length for s in layout)


def layout_spaces(layout: Layout | None) -> set[int]:
    return {s.space for s in layout or () if s.space is not None}


@dataclass
class ChannelSpace:
    """An index set created by a producer layer."""

    id: int
    channels: int
    producer: str  # fx node name
    layer: str  # parameter owner, e.g. "layer1.0.conv1"
    kind: str  # "conv", "linear", "embedding"


@dataclass
class ParamDim:
    """Dimension ``dim`` of parameter/buffer ``target`` is indexed by ``layout``; ``role`` guides importance."""

    target: str
    dim: int
    layout: Layout
    role: str  # "out", "in", "scale", "shift", "stat", "other"
    user: str  # node name of the op that reads it this way


@dataclass
class SizeArg:
    """An int argument (``args[arg]`` or ``args[arg][index]``) of ``node`` equal to a layout's length."""

    node: str
    arg: int
    index: int | None
    layout: Layout


@dataclass
class ChannelGroup:
    """Coupled channel spaces pruned together (all the same number of channels)."""

    id: int
    spaces: list[int]
    channels: int
    layers: list[str]
    reasons: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def name(self) -> str:
        return "+".join(self.layers[:3]) + (f"+{len(self.layers) - 3} more" if len(self.layers) > 3 else "")


class ChannelGraph:
    """The result of :func:`build_channel_graph`.

    Attributes:
        graph: networkx Graph whose nodes are space ids (attribute ``space``) and whose edges
            couple two spaces (attribute ``via``: the fx node that forces it).
        spaces: space id -> ChannelSpace.
        blocked: space id -> reasons it cannot be pruned.
        param_dims: every parameter/buffer dimension indexed by tracked channels.
        size_args: every int argument that states a tracked dimension's size.
        layouts: fx node name -> {dim: layout} for tracked tensor dimensions.
    """

    def __init__(self) -> None:
        self.graph = nx.Graph()
        self.spaces: dict[int, ChannelSpace] = {}
        self.blocked: dict[int, list[str]] = {}
        self.param_dims: list[ParamDim] = []
        self.size_args: list[SizeArg] = []
        self.layouts: dict[str, dict[int, Layout]] = {}

    def new_space(self, channels: int, producer: fx.Node, layer: str, kind: str) -> int:
        sid = len(self.spaces)
        self.spaces[sid] = ChannelSpace(sid, channels, producer.name, layer, kind)
        self.graph.add_node(sid, space=self.spaces[sid])
        return sid

    def couple(self, a: int, b: int, via: str) -> None:
        if a != b:
            self.graph.add_edge(a, b, via=via)

    def block(self, spaces: Iterable[int], reason: str) -> None:
        for sid in spaces:
            reasons = self.blocked.setdefault(sid, [])
            if reason not in reasons:
                reasons.append(reason)

    def groups(self) -> list[ChannelGroup]:
        """Connected components of the coupling graph, in producer order, with refusal reasons."""
        out = []
        for component in sorted(nx.connected_components(self.graph), key=min):
            members = sorted(component)
            sizes = {self.spaces[s].channels for s in members}
            reasons: list[str] = []
            for sid in members:
                for r in self.blocked.get(sid, []):
                    if r not in reasons:
                        reasons.append(r)
            if len(sizes) != 1:
                reasons.append(f"coupled layers disagree on the channel count {sorted(sizes)}")
            layers = []
            for sid in members:
                if self.spaces[sid].layer not in layers:
                    layers.append(self.spaces[sid].layer)
            out.append(ChannelGroup(len(out), members, min(sizes), layers, reasons))
        return out


# -- op tables -------------------------------------------------------------------------------

_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
    aten.silu_.default, aten.sigmoid.default, aten.sigmoid_.default, aten.tanh.default, aten.tanh_.default,
    aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default, aten.hardsigmoid_.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.relu6.default, aten.elu.default, aten.elu_.default,
    aten.leaky_relu.default, aten.leaky_relu_.default, aten.mish.default, aten.mish_.default,
    aten.softplus.default, aten.abs.default, aten.neg.default, aten.exp.default, aten.log.default,
    aten.sqrt.default, aten.rsqrt.default, aten.erf.default, aten.pow.Tensor_Scalar, aten.clamp.default,
    aten.clamp_.default, aten.clamp_min.default, aten.clamp_min_.default, aten.clamp_max.default,
    aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten._to_copy.default, aten.to.dtype,
    aten.to.dtype_layout, aten.to.device, aten.type_as.default, aten.mul.Scalar, aten.add.Scalar,
    aten.sub.Scalar, aten.div.Scalar, aten.mul_.Scalar, aten.add_.Scalar, aten.div_.Scalar,
    aten.reciprocal.default, aten.square.default, aten.sin.default, aten.cos.default, aten.tanh.default,
    aten.selu.default, aten.celu.default,
}
_BINARY = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.div_.Tensor, aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Tensor,
    aten.rsub.Tensor, aten.where.self,
}
_POOLS = {
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
    aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
             aten.unsqueeze.default}
#: Reshapes whose args[1] is the full output shape (its ints must follow pruned sizes).
_SHAPE_ARG = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
           aten.tensor_split.sections}
#: Ops that read tensors but make no tensor (metadata checks): they never constrain channels.
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default,
            aten.sym_stride.int, aten._assert_scalar.default}


def _op_label(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


class _Analysis:
    """One topological walk over the graph (see the module docstring)."""

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
        handler = _HANDLERS.get(target)
        if handler is None:
            for group, h in _GROUP_HANDLERS:
                if target in group:
                    handler = h
                    break
        if handler is None:
            if any(self.get(inp) for inp in node.all_input_nodes):
                self.block_inputs(node, f"read by {_op_label(node)} '{node.name}', which the analysis does not know")
            return
        handler(self, node)

    # -- handlers --
    def conv(self, node: fx.Node) -> None:
        x, weight, bias = node.args[0], node.args[1], argument(node, "bias")
        groups = argument(node, "groups")
        w_shape, x_shape = tensor_shape(weight), tensor_shape(x)
        if w_shape is None or x_shape is None or not isinstance(weight, fx.Node) or weight.op != "get_attr":
            self.block_inputs(node, f"convolution '{node.name}' has a computed weight")
            return
        in_layouts = self.get(x)
        for d in in_layouts:
            if d != 1:
                self.cg.block(layout_spaces(in_layouts[d]), f"used as a spatial/batch dim by convolution '{node.name}'")
        c_in, c_out = x_shape[1], w_shape[0]
        layer = layer_name(weight, fallback=str(weight.target))
        if groups == 1:
            layout_in = self.unify([(x, 1), (weight, 1)], node)
            self.record_param(weight, 1, "in", node)
            space = self.cg.new_space(c_out, node, layer, "conv")
            out = (Segment(space, c_out),)
            self.cg.layouts.setdefault(weight.name, {})[0] = out
            self.record_param(weight, 0, "out", node)
            if isinstance(bias, fx.Node) and self.adopt(bias, 0, out):
                self.record_param(bias, 0, "shift", node)
            elif isinstance(bias, fx.Node):
                self.cg.block([space], f"bias of '{node.name}' cannot be sliced")
            self.set(node, {1: out})
            del layout_in
        elif groups == c_in == c_out:
            # Depthwise: channel c in -> channel c out; slicing one slices the other.
            layout = in_layouts.get(1)
            if layout is None:
                return
            ok = self.adopt(weight, 0, layout) and (not isinstance(bias, fx.Node) or self.adopt(bias, 0, layout))
            if not ok:
                self.cg.block(layout_spaces(layout), f"depthwise weights of '{node.name}' cannot be sliced")
                return
            self.record_param(weight, 0, "out", node)
            if isinstance(bias, fx.Node):
                self.record_param(bias, 0, "shift", node)
            self.record_size_arg(node, 6, None, layout)
            self.set(node, {1: layout})
        else:
            reason = f"grouped convolution '{node.name}' (groups={groups}, not depthwise): pruning would break its groups"
            self.cg.block(layout_spaces(in_layouts.get(1)), reason)
            space = self.cg.new_space(c_out, node, layer, "conv")
            self.cg.block([space], reason)
            self.set(node, {1: (Segment(space, c_out),)})

    def linear(self, node: fx.Node) -> None:
        x, weight, bias = node.args[0], node.args[1], argument(node, "bias")
        x_shape, w_shape = tensor_shape(x), tensor_shape(weight)
        if w_shape is None or x_shape is None or not isinstance(weight, fx.Node) or weight.op != "get_attr":
            self.block_inputs(node, f"linear '{node.name}' has a computed weight")
            return
        last = len(x_shape) - 1
        self.unify([(x, last), (weight, 1)], node)
        self.record_param(weight, 1, "in", node)
        space = self.cg.new_space(w_shape[0], node, layer_name(weight, fallback=str(weight.target)), "linear")
        out = (Segment(space, w_shape[0]),)
        self.cg.layouts.setdefault(weight.name, {})[0] = out
        self.record_param(weight, 0, "out", node)
        if isinstance(bias, fx.Node):
            if self.adopt(bias, 0, out):
                self.record_param(bias, 0, "shift", node)
            else:
                self.cg.block([space], f"bias of '{node.name}' cannot be sliced")
        layouts = {d: l for d, l in self.get(x).items() if d != last}
        layouts[last] = out
        self.set(node, layouts)

    def embedding(self, node: fx.Node) -> None:
        weight, indices = node.args[0], node.args[1]
        w_shape = tensor_shape(weight)
        if w_shape is None or not isinstance(weight, fx.Node) or weight.op != "get_attr" or self.get(indices):
            self.block_inputs(node, f"embedding '{node.name}' is not a plain table lookup")
            return
        space = self.cg.new_space(w_shape[1], node, layer_name(weight, fallback=str(weight.target)), "embedding")
        out = (Segment(space, w_shape[1]),)
        self.cg.layouts.setdefault(weight.name, {})[1] = out
        self.record_param(weight, 1, "out", node)
        self.set(node, {len(tensor_shape(node)) - 1: out})

    def batch_norm(self, node: fx.Node) -> None:
        x = node.args[0]
        layout = self.get(x).get(1)
        if layout is not None:
            for name, role in (("weight", "scale"), ("bias", "shift"), ("running_mean", "stat"), ("running_var", "stat")):
                p = argument(node, name)
                if isinstance(p, fx.Node):
                    if not self.adopt(p, 0, layout):
                        self.cg.block(layout_spaces(layout), f"batch norm '{node.name}' parameters cannot be sliced")
                        break
                    self.record_param(p, 0, role, node)
        self.set(node, dict(self.get(x)))

    def layer_norm(self, node: fx.Node) -> None:
        x, normalized = node.args[0], node.args[1]
        shape = tensor_shape(x)
        layouts = self.get(x)
        first_normalized = len(shape) - len(normalized)
        for d, layout in layouts.items():
            if d < first_normalized:
                continue
            if len(normalized) != 1:
                self.cg.block(layout_spaces(layout), f"layer norm '{node.name}' normalizes several dims together")
                continue
            # rms_norm (fuse-rms-norm's) has a weight and no bias; layer_norm both
            params = (("weight", "scale"),) if node.target is aten.rms_norm.default else (("weight", "scale"), ("bias", "shift"))
            for name, role in params:
                p = argument(node, name)
                if isinstance(p, fx.Node):
                    if not self.adopt(p, 0, layout):
                        self.cg.block(layout_spaces(layout), f"layer norm '{node.name}' parameters cannot be sliced")
                    else:
                        self.record_param(p, 0, role, node)
            self.record_size_arg(node, 1, 0, layout)
        self.set(node, dict(layouts))

    def unary(self, node: fx.Node) -> None:
        self.set(node, dict(self.get(node.args[0])))

    def binary(self, node: fx.Node) -> None:
        out_shape = tensor_shape(node)
        if out_shape is None:
            self.block_inputs(node, f"{_op_label(node)} '{node.name}' makes no tensor")
            return
        rank = len(out_shape)
        tensors = [a for a in node.args if isinstance(a, fx.Node) and tensor_shape(a) is not None]
        layouts: dict[int, Layout] = {}
        for d in range(rank):
            entries = []
            for t in tensors:
                td = d - (rank - len(tensor_shape(t)))
                if td >= 0:
                    entries.append((t, td))
            if any(self.get(t).get(td) is not None for t, td in entries):
                layout = self.unify(entries, node)
                if layout is not None:
                    layouts[d] = layout
                    for t, td in entries:
                        self.record_param(t, td, "other", node)
        self.set(node, layouts)

    def pool(self, node: fx.Node) -> None:
        layouts = self.get(node.args[0])
        for d, layout in layouts.items():
            if d >= 2:  # pooling mixes neighbouring positions of spatial dims only
                self.cg.block(layout_spaces(layout), f"pooled over by '{node.name}'")
        self.set(node, {d: l for d, l in layouts.items() if d < 2})

    def reduction(self, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(tensor_shape(x))
        dims = argument(node, "dim")
        dims = [dims] if isinstance(dims, int) else list(dims or range(rank))
        dims = {d % rank for d in dims}
        keepdim = argument(node, "keepdim")
        layouts: dict[int, Layout] = {}
        out_d = 0
        for d in range(rank):
            if d in dims:
                out_d += 1 if keepdim else 0
                continue
            if d in self.get(x):
                layouts[out_d] = self.get(x)[d]
            out_d += 1
        self.set(node, layouts)

    def permute(self, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(tensor_shape(x))
        if node.target is aten.permute.default:
            order = [d % rank for d in node.args[1]]
        elif node.target is aten.t.default:
            order = [1, 0][:rank]
        else:
            a, b = node.args[1] % rank, node.args[2] % rank
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        self.set(node, {i: self.get(x)[src] for i, src in enumerate(order) if src in self.get(x)})

    def reshape(self, node: fx.Node) -> None:
        x = node.args[0]
        in_shape, out_shape = tensor_shape(x), tensor_shape(node)
        layouts: dict[int, Layout] = {}
        for d, layout in self.get(x).items():
            mapped = _map_reshaped_dim(in_shape, out_shape, d, set(self.get(x)))
            if mapped is None:
                self.cg.block(layout_spaces(layout), f"reshaped by '{node.name}' {list(in_shape)} -> {list(out_shape)}, "
                                                     "which splits the channels (e.g. into attention heads or groups)")
                continue
            out_d, inner = mapped
            new = tuple(Segment(s.space, s.channels, s.inner * inner) for s in layout)
            layouts[out_d] = new
            if node.target in _SHAPE_ARG:
                self.record_size_arg(node, 1, out_d, new)
        self.set(node, layouts)

    def expand(self, node: fx.Node) -> None:
        x = node.args[0]
        offset = len(tensor_shape(node)) - len(tensor_shape(x))
        layouts = {d + offset: l for d, l in self.get(x).items()}
        for d, l in layouts.items():
            self.record_size_arg(node, 1, d, l)
        self.set(node, layouts)

    def select(self, node: fx.Node) -> None:
        x, dim = node.args[0], node.args[1]
        rank = len(tensor_shape(x))
        dim %= rank
        layouts = self.get(x)
        if dim in layouts:
            self.cg.block(layout_spaces(layouts[dim]), f"single channels are selected by '{node.name}'")
        self.set(node, {(d if d < dim else d - 1): l for d, l in layouts.items() if d != dim})

    def slice(self, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(tensor_shape(x))
        dim = argument(node, "dim") % rank
        layouts = dict(self.get(x))
        if dim in layouts and tensor_shape(node)[dim] != tensor_shape(x)[dim]:
            self.cg.block(layout_spaces(layouts.pop(dim)), f"a channel range is sliced by '{node.name}'")
        self.set(node, layouts)

    def split(self, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(tensor_shape(x))
        dim = argument(node, "dim") % rank
        layouts = dict(self.get(x))
        if dim in layouts:
            self.cg.block(layout_spaces(layouts.pop(dim)), f"channels are split by '{node.name}'")
        if node.target is aten.unbind.int:
            layouts = {(d if d < dim else d - 1): l for d, l in layouts.items()}
        self.set(node, layouts)

    def cat(self, node: fx.Node) -> None:
        tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
        rank = len(tensor_shape(node))
        dim = argument(node, "dim") % rank
        layouts: dict[int, Layout] = {}
        for d in range(rank):
            if d == dim:
                if any(self.get(t).get(d) for t in tensors):
                    segs: list[Segment] = []
                    for t in tensors:
                        own = self.get(t).get(d)
                        segs.extend(own if own else (Segment(None, tensor_shape(t)[d]),))
                    layouts[d] = tuple(segs)
            elif any(self.get(t).get(d) for t in tensors):
                layout = self.unify([(t, d) for t in tensors], node)
                if layout is not None:
                    layouts[d] = layout
                    for t in tensors:
                        self.record_param(t, d, "other", node)
        self.set(node, layouts)

    def matmul(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        sa, sb = tensor_shape(a), tensor_shape(b)
        if len(sa) < 2 or len(sb) < 2:
            self.block_inputs(node, f"matmul '{node.name}' on vectors")
            return
        if self.get(a).get(len(sa) - 1) or self.get(b).get(len(sb) - 2):
            self.unify([(a, len(sa) - 1), (b, len(sb) - 2)], node)
            self.record_param(a, len(sa) - 1, "in", node)
            self.record_param(b, len(sb) - 2, "in", node)
        rank = len(tensor_shape(node))
        layouts: dict[int, Layout] = {}
        for d, l in self.get(a).items():
            if d == len(sa) - 2:
                layouts[rank - 2] = l
            elif d < len(sa) - 2:
                self.cg.block(layout_spaces(l), f"batch dim of matmul '{node.name}'")
        for d, l in self.get(b).items():
            if d == len(sb) - 1:
                layouts[rank - 1] = l
                self.record_param(b, d, "out", node)
            elif d < len(sb) - 2:
                self.cg.block(layout_spaces(l), f"batch dim of matmul '{node.name}'")
        self.set(node, layouts)

    def pad(self, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(tensor_shape(x))
        padded = {rank - 1 - i // 2 for i, amount in enumerate(node.args[1]) if amount != 0}
        self.along_dims(node, padded, "padded")

    def roll(self, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(tensor_shape(x))
        dims = argument(node, "dims")
        dims = [dims] if isinstance(dims, int) else list(dims)
        self.along_dims(node, {d % rank for d in dims} if dims else set(range(rank)), "rolled")

    def along_dims(self, node: fx.Node, dims: set[int], verb: str) -> None:
        """Shape-preserving op that mixes positions along ``dims``: channels there are refused."""
        layouts = dict(self.get(node.args[0]))
        for d in dims & set(layouts):
            self.cg.block(layout_spaces(layouts.pop(d)), f"channels are {verb} by '{node.name}'")
        self.set(node, layouts)

    def softmax(self, node: fx.Node) -> None:
        x = node.args[0]
        dim = node.args[1] % len(tensor_shape(x))
        layouts = dict(self.get(x))
        if dim in layouts:
            self.cg.block(layout_spaces(layouts[dim]), f"normalized over by softmax '{node.name}'")
        self.set(node, layouts)


def _map_reshaped_dim(in_shape: tuple[int, ...], out_shape: tuple[int, ...], d: int, tracked: set[int]) -> tuple[int, int] | None:
    """Where input dim ``d`` lands after a reshape: (output dim, inner block) or None if split.

    The dim survives when some output dim starts at the same flat offset (equal prefix products)
    and is either the same size, or the dim merged with following untracked dims (a flatten).
    """
    prefix = numel(in_shape[:d])
    size = in_shape[d]
    for od in range(len(out_shape)):
        if numel(out_shape[:od]) != prefix:
            continue
        if out_shape[od] == 1 and size != 1:
            continue  # a size-1 dim inserted before ours
        if out_shape[od] == size:
            return od, 1
        inner = 1
        for k in range(d + 1, len(in_shape)):
            if k in tracked:
                return None
            inner *= in_shape[k]
            if size * inner == out_shape[od]:
                return od, inner
            if size * inner > out_shape[od]:
                return None
        return None
    return None


_HANDLERS: dict[Any, Any] = {
    aten.linear.default: _Analysis.linear,
    aten.embedding.default: _Analysis.embedding,
    aten.batch_norm.default: _Analysis.batch_norm,
    aten.layer_norm.default: _Analysis.layer_norm,
    aten.rms_norm.default: _Analysis.layer_norm,
    aten.permute.default: _Analysis.permute,
    aten.transpose.int: _Analysis.permute,
    aten.swapaxes.default: _Analysis.permute,
    aten.pad.default: _Analysis.pad,
    aten.constant_pad_nd.default: _Analysis.pad,
    aten.roll.default: _Analysis.roll,
    aten.t.default: _Analysis.permute,
    aten.expand.default: _Analysis.expand,
    aten.select.int: _Analysis.select,
    aten.slice.Tensor: _Analysis.slice,
    aten.cat.default: _Analysis.cat,
    aten.matmul.default: _Analysis.matmul,
    aten.mm.default: _Analysis.matmul,
    aten.bmm.default: _Analysis.matmul,
    aten.softmax.int: _Analysis.softmax,
    aten._softmax.default: _Analysis.softmax,
    aten.log_softmax.int: _Analysis.softmax,
}
_GROUP_HANDLERS = [
    (_CONVS, _Analysis.conv),
    (_UNARY, _Analysis.unary),
    (_BINARY, _Analysis.binary),
    (_POOLS, _Analysis.pool),
    (_REDUCTIONS, _Analysis.reduction),
    (_RESHAPES, _Analysis.reshape),
    (_SPLITS, _Analysis.split),
]


def build_channel_graph(graph_module: fx.GraphModule) -> ChannelGraph:
    """Analyse ``graph_module`` (ATen dialect with ``meta["val"]``) into a :class:`ChannelGraph`."""
    return _Analysis(graph_module).run()


def keep_indices(layout: Layout, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """Indices along a dimension with ``layout`` that survive, given kept channels per space."""
    parts, offset = [], 0
    for seg in layout:
        channels = kept.get(seg.space) if seg.space is not None else None
        if channels is None:
            channels = torch.arange(seg.channels)
        block = (channels[:, None] * seg.inner + torch.arange(seg.inner)[None, :]).reshape(-1)
        parts.append(block + offset)
        offset += seg.length
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def pruned_length(layout: Layout, kept: dict[int, torch.Tensor]) -> int:
    """The length of a dimension with ``layout`` after pruning."""
    return sum((len(kept[s.space]) if s.space in kept else s.channels) * s.inner for s in layout)


__all__ = ["ChannelGraph", "ChannelGroup", "ChannelSpace", "Layout", "ParamDim", "Segment", "SizeArg",
           "build_channel_graph", "keep_indices", "layout_length", "pruned_length"]
