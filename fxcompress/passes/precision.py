"""fp16: weights and compute in half precision, fp32 kept where accuracy needs it.

Matrix ops (conv, linear, matmul) run in fp16 and their weights are stored as fp16, halving the
file and using the GPU's tensor cores. Cheap ops that only move or combine values (ReLU, GELU,
residual add, pooling, reshapes) follow the precision of their inputs. Softmax, normalization
(layer/batch/group norm) and reductions (mean, sum, variance) are computed in fp32: their
accumulations lose most in fp16 and cost little. An op that mixes an fp16 activation with an fp32
one (an attention mask, a position table) also runs in fp32, so a large fp32 constant is never
rounded to fp16 infinity. Graph inputs and outputs keep the model's dtypes: the pass inserts the
casts at the boundaries.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from fxcompress.analysis.attributes import attribute, replace_attribute
from fxcompress.infra.pass_base import Pass, PassResult, option
from fxcompress.infra.registry import register

aten = torch.ops.aten

#: Compute-heavy ops run in fp16 whatever the precision of their inputs.
_HALF_COMPUTE = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
    aten.conv_transpose2d.input, aten.linear.default, aten.matmul.default, aten.mm.default,
    aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
    aten.scaled_dot_product_attention.default,
}

#: Ops whose accuracy needs fp32 (accumulations, exponentials over rows, statistics).
_FP32_ONLY = {
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default, aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default, aten.group_norm.default, aten.native_group_norm.default,
    aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.var.correction, aten.var.dim,
    aten.std.correction, aten.std.dim, aten.norm.Scalar, aten.linalg_vector_norm.default, aten.cumsum.default,
    aten.logsumexp.default, aten.exp.default, aten.log.default, aten.pow.Tensor_Scalar, aten.rsqrt.default,
    aten.sqrt.default, aten.cross_entropy_loss.default,
}

#: Ops that follow their inputs: fp16 when every float activation input is fp16.
_FOLLOW = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardsigmoid.default, aten.sigmoid.default, aten.tanh.default, aten.clamp.default,
    aten.leaky_relu.default, aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor,
    aten.mul_.Tensor, aten.div.Tensor, aten.neg.default, aten.max_pool2d.default, aten.max_pool1d.default,
    aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.cat.default, aten.flatten.using_ints,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
    aten.contiguous.default, aten.clone.default, aten.dropout.default, aten.expand.default,
    aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default,
    aten.alias.default,
    aten.pad.default, aten.constant_pad_nd.default, aten.upsample_nearest2d.vec,
}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _float_dtype(node: Any) -> torch.dtype | None:
    val = _val(node)
    if isinstance(val, torch.Tensor) and val.is_floating_point():
        return val.dtype
    return None


def _with_dtype(val: Any, dtype: torch.dtype) -> Any:
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return val
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return val.to(dtype)
    with mode:
        return val.to(dtype)



@dataclass(frozen=True)
class ConvertFp16Options:
    keep_fp32: tuple[str, ...] = option((), "extra ATen op names kept in fp32, e.g. ('aten.gelu.default',)")


@register
class ConvertFp16Pass(Pass):
    """Half precision for weights and compute; fp32 for softmax, normalization, reductions and graph I/O."""

    name = "convert-fp16"
    Options = ConvertFp16Options
    lossless = False
    exports_exactly = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        if any(_float_dtype(n) == torch.float16 for n in graph.nodes if n.op == "get_attr"):
            return PassResult(graph_module, False, {"already_fp16": True})
        keep = {str(name) for name in self.options.keep_fp32}
        precision: dict[fx.Node, torch.dtype] = {}  # the dtype each float node produces after the pass
        casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        half_ops = fp32_ops = 0

        def cast(value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
            if precision.get(value, _float_dtype(value)) == dtype:
                return value
            key = (value, dtype)
            if key not in casts:
                with graph.inserting_after(value if value.op != "placeholder" else _last_placeholder(graph)):
                    node = graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
                node.meta["val"] = _with_dtype(_val(value), dtype)
                casts[key] = node
                precision[node] = dtype
            return casts[key]

        # Weights read only by fp16 compute are stored in fp16 (half the bytes); others stay fp32.
        half_weights = set()
        for node in graph.nodes:
            if node.op == "get_attr" and _float_dtype(node) == torch.float32 and node.users and \
                    all(u.target in _HALF_COMPUTE and str(u.target) not in keep for u in node.users):
                half_weights.add(node)
        for node in half_weights:
            replace_attribute(graph_module, node.target, attribute(graph_module, node.target).detach().to(torch.float16))
            node.meta["val"] = _with_dtype(_val(node), torch.float16)
            precision[node] = torch.float16

        for node in list(graph.nodes):
            if node.op != "call_function" or node in casts.values():
                continue
            if node.target is operator.getitem and precision.get(node.args[0]) == torch.float16:
                precision[node] = torch.float16  # one piece of a split that ran in fp16
                node.meta["val"] = _with_dtype(_val(node), torch.float16)
                continue
            inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs))
                      if isinstance(a, fx.Node) and _float_dtype(a) is not None]
            if not inputs or _float_dtype(node) is None and not isinstance(_val(node), (tuple, list)):
                continue
            target = node.target
            dtypes = {precision.get(a, _float_dtype(a)) for a in inputs if a.op != "get_attr"}
            if not {precision.get(a, _float_dtype(a)) for a in inputs} <= {torch.float32, torch.float16}:
                continue  # float64/bfloat16 models keep their precision
            if str(target) in keep or target in _FP32_ONLY or target not in (_HALF_COMPUTE | _FOLLOW):
                want = torch.float32
            elif target in _HALF_COMPUTE:
                want = torch.float16
            else:
                want = torch.float16 if dtypes == {torch.float16} else torch.float32
            if want == torch.float16:
                half_ops += target in _HALF_COMPUTE
            else:
                fp32_ops += target in _FP32_ONLY
            for a in inputs:
                if precision.get(a, _float_dtype(a)) != want:
                    node.replace_input_with(a, cast(a, want, node))
            if want == torch.float16:
                precision[node] = torch.float16
                node.meta["val"] = pytree.tree_map(lambda v: _with_dtype(v, torch.float16) if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else v, _val(node))
        # Outputs keep the model's dtypes.
        output = next(n for n in graph.nodes if n.op == "output")
        for value in pytree.tree_leaves(output.args):
            if isinstance(value, fx.Node) and precision.get(value) == torch.float16:
                with graph.inserting_before(output):
                    back = graph.call_function(aten._to_copy.default, (value,), {"dtype": torch.float32})
                back.meta["val"] = _with_dtype(_val(value), torch.float32)
                output.replace_input_with(value, back)
        modified = bool(half_weights or half_ops)
        return PassResult(graph_module, modified, {"fp16_compute_ops": half_ops, "fp32_kept_ops": fp32_ops,
                                                   "fp16_weights": len(half_weights), "casts": len(casts)})


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]
