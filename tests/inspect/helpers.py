"""Test-only passes for the inspection tests: a batch-norm fold and a node renamer.

The real fold-batchnorm pass lives in fxcompress/passes/fold_batchnorm.py; this small fold lets the diff
tests run on their own and is exact (conv weight and bias absorb the eval-mode batch norm).
"""

from __future__ import annotations

import torch
from torch import fx

from fxcompress.infra.pass_base import Pass, PassResult, Rejection
from fxcompress.graph_meta import PROVENANCE_KEY
from fxcompress.passes.cleanup import drop_unused_state

aten = torch.ops.aten


def _tensor(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    return None if node is None else gm.get_parameter(node.target) if node.target in dict(gm.named_parameters()) else gm.get_buffer(node.target)


class FoldBatchNormForTests(Pass):
    """Fold aten.batch_norm into the aten.conv2d feeding it (eval mode, conv used only by the BN)."""

    name = "test-fold-batchnorm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        folded, rejections = 0, []
        for bn in list(gm.graph.nodes):
            if bn.op != "call_function" or bn.target is not aten.batch_norm.default:
                continue
            conv = bn.args[0]
            if not (isinstance(conv, fx.Node) and conv.target is aten.conv2d.default):
                rejections.append(Rejection("conv-bn", bn.name, "input is not a conv2d"))
                continue
            if len(conv.users) != 1:
                rejections.append(Rejection("conv-bn", bn.name, f"conv {conv.name} output is used elsewhere"))
                continue
            weight = _tensor(gm, conv.args[1])
            bias = _tensor(gm, conv.args[2] if len(conv.args) > 2 else None)
            gamma, beta, mean, var = (_tensor(gm, a) for a in bn.args[1:5])
            eps = bn.args[7]
            scale = gamma / torch.sqrt(var + eps)
            new_w = (weight * scale.reshape(-1, 1, 1, 1)).detach()
            new_b = ((bias if bias is not None else torch.zeros_like(mean)) - mean) * scale + beta
            w_name, b_name = f"{conv.name}_folded_weight", f"{conv.name}_folded_bias"
            gm.register_parameter(w_name, torch.nn.Parameter(new_w, requires_grad=False))
            gm.register_parameter(b_name, torch.nn.Parameter(new_b.detach(), requires_grad=False))
            with gm.graph.inserting_before(conv):
                w_node, b_node = gm.graph.get_attr(w_name), gm.graph.get_attr(b_name)
            for node, value in ((w_node, new_w), (b_node, new_b)):
                node.meta["val"] = conv.args[1].meta["val"].new_empty(value.shape)
                node.meta[PROVENANCE_KEY] = {"pass": self.name, "from": [bn.name]}
            conv.args = (conv.args[0], w_node, b_node, *conv.args[3:])
            bn.replace_all_uses_with(conv)
            gm.graph.erase_node(bn)
            folded += 1
        if folded:
            for node in list(gm.graph.nodes):
                if node.op == "get_attr" and not node.users:
                    gm.graph.erase_node(node)
            drop_unused_state(gm)
        return PassResult(gm, bool(folded), {"folded": folded}, rejections)


class RenameNodesForTests(Pass):
    """Rename every compute node (``x`` -> ``x_r``) without changing what the graph computes."""

    name = "test-rename-nodes"

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and not node.name.endswith("_r"):
                node.name = gm.graph._graph_namespace.create_name(f"{node.name}_r", None)
                changed = True
        return PassResult(gm, changed)


def residual() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Factory for CLI specs (``tests.inspect.helpers:residual``): three conv-bn blocks."""
    from tests.models import Residual, randomize_bn

    return randomize_bn(Residual()).eval(), (torch.randn(1, 3, 8, 8),)


def small_onnx(*, relu: bool = True, extra_add: bool = False, prefix: str = "", zero_weights: bool = False,
               quantized: bool = False):
    """A hand-built ONNX model: Conv(3->4, 3x3, 8x8) [-> Relu] [-> Add] -> Flatten -> Gemm(256->5).

    ``prefix`` renames every node and intermediate tensor (same structure, new names). MACs by
    hand: conv 4*8*8 outputs x 3*3*3 = 6912; gemm 5 outputs x 256 = 1280.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    if zero_weights:
        w[:2] = 0.0  # half of the conv weights
    inits = [numpy_helper.from_array(w, "conv.weight"), numpy_helper.from_array(np.zeros(4, np.float32), "conv.bias"),
             numpy_helper.from_array(rng.standard_normal((5, 256)).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(np.zeros(5, np.float32), "fc.bias")]
    t = lambda name: f"{prefix}{name}"  # noqa: E731
    nodes = []
    conv_in, conv_w = "x", "conv.weight"
    if quantized:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], [t("xq")], name=t("q_x")),
                  helper.make_node("DequantizeLinear", [t("xq"), "s", "z"], [t("xdq")], name=t("dq_x")),
                  helper.make_node("QuantizeLinear", ["conv.weight", "s", "z"], [t("wq")], name=t("q_w")),
                  helper.make_node("DequantizeLinear", [t("wq"), "s", "z"], [t("wdq")], name=t("dq_w"))]
        conv_in, conv_w = t("xdq"), t("wdq")
    nodes.append(helper.make_node("Conv", [conv_in, conv_w, "conv.bias"], [t("c")], name=t("conv"), pads=[1, 1, 1, 1]))
    last = t("c")
    if relu:
        nodes.append(helper.make_node("Relu", [last], [t("r")], name=t("relu")))
        last = t("r")
    if extra_add:
        nodes.append(helper.make_node("Add", [last, last], [t("a")], name=t("add")))
        last = t("a")
    nodes.append(helper.make_node("Flatten", [last], [t("f")], name=t("flatten")))
    nodes.append(helper.make_node("Gemm", [t("f"), "fc.weight", "fc.bias"], ["y"], name=t("fc"), transB=1))
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
