"""fp16: half weights/compute, fp32 normalization/softmax/reductions, model dtypes at the boundary."""

from __future__ import annotations

import onnx
import torch
from torch import nn

import fxcompress
from fxcompress.passes.precision import ConvertFp16Pass
from tests.models import ConvBnRelu, randomize_bn

aten = torch.ops.aten


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.norm(torch.relu(self.fc(x)) + x)
        return torch.softmax(self.out(h), -1), (h * h).mean(-1)


def _val_dtype(node):
    return node.meta["val"].dtype


def test_matrix_ops_in_fp16_and_accuracy_ops_in_fp32():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 16)
    result = fxcompress.compile(model, (x,), [ConvertFp16Pass()])
    gm = result.module
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    assert gm.fc.weight.dtype == torch.float16 and gm.norm.weight.dtype == torch.float32
    assert _val_dtype(nodes[aten.linear.default]) == torch.float16
    for target in (aten.layer_norm.default, aten.softmax.int, aten.mean.dim):
        node = nodes[target]
        assert _val_dtype(node) == torch.float32 and _val_dtype(node.args[0]) == torch.float32
    outputs = gm(x)
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32]
    assert result.report.drift < 0.01
    assert not ConvertFp16Pass()(gm).modified


def test_cnn_exports_with_fp16_weights_and_fp32_io(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(ConvBnRelu()).eval()
    x = torch.randn(1, 3, 16, 16)
    result = fxcompress.compile(model, (x,), "fp16")
    path = result.export_onnx(tmp_path / "fp16.onnx")
    assert result.report.parity.passed
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dtypes = {init.data_type for init in proto.graph.initializer if len(init.dims) == 4}
    assert dtypes == {onnx.TensorProto.FLOAT16}
