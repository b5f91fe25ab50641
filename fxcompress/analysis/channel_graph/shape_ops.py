"""Channel handlers of ops that move, cut or join dimensions: permutes, reshapes, slices, splits, cat, pad."""

from __future__ import annotations

import torch
from torch import fx

from fxcompress.analysis.arguments import argument
from fxcompress.analysis.channel_graph.model import Layout, Segment, layout_spaces
from fxcompress.analysis.channel_graph.ops import _SHAPE_ARG
from fxcompress.analysis.shapes import numel, tensor_shape

aten = torch.ops.aten


class ShapeOps:
    """Handlers (mixed into the walk) of permutes, reshapes, expand, select, slice, split, cat, pad, roll."""

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
