"""The ATen ops the channel analysis groups by how they treat channels, and how it names an op."""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

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
