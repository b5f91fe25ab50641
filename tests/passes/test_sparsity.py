"""sparsify-2:4, sparsify-magnitude and the compact export of sparse weights."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.errors import RecipeError
from fxcompress.export.onnx_export import export_model_proto
from fxcompress.export.sparse import bake_weight_masks, compress_initializers
from fxcompress.graph_meta import MASK_META
from fxcompress.passes.sparsity import (SparsifyMagnitudePass, SparsifyTwoFourPass, masked_weights,
                                        two_four_mask)
from fxcompress.runtime.parity import validate


class Small(nn.Module):
    def __init__(self, odd_in: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 3 input channels: not a multiple of 4
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(y.mean((2, 3)))


def _effective(gm, target: str) -> torch.Tensor:
    mask_target = target + "_mask"
    return gm.get_parameter(target).detach() * gm.get_buffer(mask_target)


def test_two_four_mask_keeps_two_largest_of_every_four_input_channels():
    w = torch.tensor([[1.0, -4.0, 2.0, 3.0, 0.5, 0.1, -0.2, 0.3]])
    assert two_four_mask(w).tolist() == [[False, True, False, True, True, False, False, True]]
    conv = torch.randn(5, 8, 3, 3)
    groups = two_four_mask(conv).movedim(1, -1).reshape(5, 3, 3, 2, 4)
    assert (groups.sum(-1) == 2).all()


def test_two_four_structure_skips_and_idempotence():
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 6, 6),)
    gm = capture(Small(), x)
    result = SparsifyTwoFourPass()(gm)
    assert result.modified and result.stats["masked"] == 2 and result.stats["sparsity"] == 0.5
    assert [r.node for r in result.rejections] == ["conv.weight"]
    assert len(masked_weights(gm)) == 2
    w = _effective(gm, "conv2.weight").movedim(1, -1).reshape(16, 3, 3, 2, 4)
    assert ((w != 0).sum(-1) <= 2).all()
    assert (gm.get_parameter("conv2.weight") == _effective(gm, "conv2.weight")).all()  # zeroed in place too
    gm.graph.lint()
    assert SparsifyTwoFourPass()(gm).modified is False


def test_masks_survive_fine_tuning():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    gm = capture(Small(), (x,))
    SparsifyTwoFourPass()(gm)
    gm.recompile()
    masked = gm.get_buffer("fc.weight_mask") == 0
    optimizer = torch.optim.Adam(gm.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        gm(x).sum().backward()
        assert (gm.get_parameter("fc.weight").grad[masked] == 0).all()
        optimizer.step()
    assert (gm.get_parameter("fc.weight").detach()[masked] == 0).all()


def test_magnitude_global_layer_and_overrides():
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 6, 6),)
    gm = capture(Small(), x)
    result = SparsifyMagnitudePass(sparsity=0.8)(gm)
    assert result.modified and result.stats["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert SparsifyMagnitudePass(sparsity=0.8)(gm).modified is False
    gm = capture(Small(), x)
    SparsifyMagnitudePass(sparsity=0.5, allocation="layer", overrides={"fc": 0.0})(gm)
    for target in ("conv.weight", "conv2.weight"):
        zeros = (_effective(gm, target) == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=0.02)
    assert not hasattr(gm.get_submodule("fc"), "weight_mask")


@pytest.mark.parametrize("bad", [{"sparsity": 1.0}, {"sparsity": -0.5}, {"overrides": {"fc": 2.0}}])
def test_bad_sparsity_options(bad):
    with pytest.raises(RecipeError):
        SparsifyMagnitudePass(bad)


def test_bake_and_compact_export_keep_parity_and_shrink():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    x = (torch.randn(2, 64),)
    gm = capture(model, x)
    SparsifyMagnitudePass(sparsity=0.8)(gm)
    gm.recompile()
    baked = bake_weight_masks(gm)
    assert not any(n.meta.get(MASK_META) for n in baked.graph.nodes) and masked_weights(gm)  # original untouched
    torch.testing.assert_close(baked(*x), gm(*x))
    dense, _ = export_model_proto(baked, x)
    # 80% zeros: int64-indexed sparse initializers ~1.7x smaller, the bitmask encoding ~4x.
    for encoding, factor in (("sparse", 1.5), ("bitmask", 3.0), ("auto", 3.0)):
        compact, stats = compress_initializers(dense, encoding=encoding)
        assert stats.tensors and compact.ByteSize() < dense.ByteSize() / factor
        onnx.checker.check_model(compact)
        assert validate(compact, gm, x, tolerance=1e-5).passed
    compact, stats = compress_initializers(dense, encoding="sparse")
    assert len(compact.graph.sparse_initializer) == len(stats.tensors)


def test_ort_folds_the_bitmask_decoders_at_load(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    x = (torch.randn(1, 64),)
    gm = capture(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), x)
    SparsifyMagnitudePass(sparsity=0.8)(gm)
    gm.recompile()
    dense, _ = export_model_proto(bake_weight_masks(gm), x)
    compact, _ = compress_initializers(dense, encoding="bitmask")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(compact.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"BitShift", "CumSum", "Gather", "Where"}, ops  # decoded once, at load


def test_dense_weights_are_left_alone():
    model = nn.Sequential(nn.Linear(64, 64))
    x = (torch.randn(1, 64),)
    dense, _ = export_model_proto(capture(model, x), x)
    compact, stats = compress_initializers(dense)
    assert not stats.tensors and compact.ByteSize() == dense.ByteSize()


def test_sparse_preset_export_option(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    x = (torch.randn(1, 64),)
    result = fxcompress.compile(model, x, recipe="sparse")
    plain = result.export_onnx(tmp_path / "plain.onnx", tolerance=1e-4)
    small = result.export_onnx(tmp_path / "small.onnx", tolerance=1e-4, sparse=True)
    assert result.report.parity.passed
    assert small.stat().st_size < plain.stat().st_size
    assert "_mask" not in str([i.name for i in onnx.load(str(plain)).graph.initializer])
