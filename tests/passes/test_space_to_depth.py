"""conv-space-to-depth: strided few-channel convs become pad -> space_to_depth -> stride-1 conv."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.passes.space_to_depth import space_to_depth, space_to_depth_weight
from fxcompress.runtime.session import create_session
from tests.passes.helpers import run_pass

aten = torch.ops.aten


class Stem(nn.Module):
    """A ResNet-like stem (kernel k, stride s, padding p on 3 channels), then a small body and head."""

    def __init__(self, kernel: int = 7, stride: int = 2, padding: int = 3, dilation: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel, stride, padding, dilation=dilation)
        self.body = nn.Conv2d(8, 8, 3, 2, 1)  # strided too, but 8 input channels: left alone
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.fc(y.mean((2, 3)))


def _stem(size: int = 32, **kwargs):
    torch.manual_seed(0)
    return Stem(**kwargs).eval(), (torch.randn(2, 3, size, size),)


def _convs(gm):
    return [n for n in gm.graph.nodes if n.target is aten.conv2d.default]


@pytest.mark.parametrize("kernel, stride, padding, size", [
    (7, 2, 3, 32),  # ResNet stem
    (3, 2, 1, 32),  # MobileNet / EfficientNet stem
    (4, 4, 0, 32),  # ConvNeXt / Swin patchify
    (3, 2, 0, 31),  # odd input, no padding (Inception)
    (5, 3, 2, 29),  # stride 3
])
def test_rewrite_is_exact_and_idempotent(kernel, stride, padding, size):
    model, inputs = _stem(size, kernel=kernel, stride=stride, padding=padding)
    with torch.no_grad():
        reference = model(*inputs)
    gm = capture(model, inputs)
    result = run_pass("conv-space-to-depth", gm)
    assert result.modified and result.stats["convs_rewritten"] == 1
    stem, body = _convs(result.graph_module)
    blocks = stem.args[0]
    assert blocks.target is space_to_depth and blocks.args[0].target is aten.constant_pad_nd.default
    assert list(stem.args[3]) == [1, 1] and list(stem.args[4]) == [0, 0]  # stride 1, no padding
    weight = result.graph_module.get_parameter(stem.args[1].target)
    assert weight.shape == (8, 3 * stride * stride, -(-kernel // stride), -(-kernel // stride))
    assert list(body.args[3]) == [2, 2]  # the 8-channel conv is untouched
    # the replaced weight left the module: the export must not carry it
    assert "stem.weight" not in dict(result.graph_module.named_parameters())
    with torch.no_grad():
        out = result.graph_module(*inputs)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_space_to_depth_matches_the_onnx_channel_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 12, 2, 3)
    for bh in range(2):
        for bw in range(2):
            for c in range(3):  # ONNX SpaceToDepth: channel (bh * block + bw) * C + c
                torch.testing.assert_close(y[:, (bh * 2 + bw) * 3 + c], x[:, c, bh::2, bw::2])


def test_weight_transform_against_a_direct_convolution():
    torch.manual_seed(1)
    x, weight = torch.randn(1, 2, 15, 15), torch.randn(5, 2, 5, 5)
    expected = torch.nn.functional.conv2d(x, weight, stride=2, padding=2)  # 8 x 8 out
    padded = torch.nn.functional.pad(x, (2, 3, 2, 3))  # 2 * (8 + 3 - 1) = 20
    got = torch.nn.functional.conv2d(space_to_depth(padded, 2), space_to_depth_weight(weight, 2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dilated_conv_is_declined_with_a_reason():
    model, inputs = _stem(kernel=3, stride=2, padding=2, dilation=2)
    result = run_pass("conv-space-to-depth", capture(model, inputs))
    assert not result.modified
    assert [r.reason for r in result.rejections] == ["dilated convolution (dilation [2, 2])"]


def test_option_max_in_channels_limits_the_rewrite():
    model, inputs = _stem()
    assert not run_pass("conv-space-to-depth", capture(model, inputs), max_in_channels=2).modified
    assert run_pass("conv-space-to-depth", capture(model, inputs), max_in_channels=8).stats["convs_rewritten"] == 2


def test_export_is_one_space_to_depth_node_and_matches_in_ort(tmp_path):
    model, inputs = _stem()
    result = fxcompress.compile(model, inputs, ["conv-space-to-depth"],
                                options=fxcompress.CompileOptions(dynamic_batch=True))
    path = result.export_onnx(tmp_path / "s2d.onnx", dynamic_batch=True)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["SpaceToDepth"] == 1 and ops["Pad"] == 1 and "Transpose" not in ops
    assert result.report.parity.passed and result.report.parity.drift < 1e-5
    session = create_session(path, "cpu")
    batch = torch.randn(5, 3, 32, 32)  # another batch size than the example's
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run([batch])[0]), model(batch), rtol=1e-4, atol=1e-5)


def test_int8_preset_rewrites_the_stem_before_quantizing_it(tmp_path):
    model, inputs = _stem()
    calibration = [(torch.randn(2, 3, 32, 32),) for _ in range(4)]
    result = fxcompress.compile(model, inputs, "int8", calibration=calibration)
    names = [r.name for r in result.report.records]
    assert names.index("conv-space-to-depth") < names.index("quantize-int8")
    path = result.export_onnx(tmp_path / "q.onnx")
    create_session(path, "cpu", optimized_model_path=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["SpaceToDepth"] == 1 and ops["QLinearConv"] == 2 and "Conv" not in ops, ops
    assert result.report.parity.passed
