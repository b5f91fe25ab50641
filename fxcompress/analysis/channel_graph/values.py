"""Channel handlers of ops that compute values: elementwise ops, pooling, reductions, matmul, softmax."""

from __future__ import annotations

from torch import fx

from fxcompress.analysis.arguments import argument
from fxcompress.analysis.channel_graph.model import Layout, layout_spaces
from fxcompress.analysis.channel_graph.ops import _op_label
from fxcompress.analysis.shapes import tensor_shape


class ValueOps:
    """Handlers (mixed into the walk) of elementwise ops, pooling, reductions, matmul and softmax."""

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

    def softmax(self, node: fx.Node) -> None:
        x = node.args[0]
        dim = node.args[1] % len(tensor_shape(x))
        layouts = dict(self.get(x))
        if dim in layouts:
            self.cg.block(layout_spaces(layouts[dim]), f"normalized over by softmax '{node.name}'")
        self.set(node, layouts)
