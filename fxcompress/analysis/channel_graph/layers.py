"""Channel handlers of the layers that create or carry channel spaces: conv, linear, embedding, norms."""

from __future__ import annotations

import torch
from torch import fx

from fxcompress.analysis.arguments import argument
from fxcompress.analysis.channel_graph.model import Segment, layout_spaces
from fxcompress.analysis.shapes import tensor_shape
from fxcompress.graph_meta import layer_name

aten = torch.ops.aten


class LayerOps:
    """Handlers (mixed into the walk) of conv, linear, embedding, batch / layer / rms norm."""

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
