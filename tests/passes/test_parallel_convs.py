"""merge-parallel-convs: structure, idempotence, fp32 parity and rejections, on synthetic
multi-branch blocks and on timm's RepVGG / MobileOne / FastViT (batch norms randomized: timm
zero-initialises some, which would hide a wrong merge)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from tests.models import randomize_bn
from tests.passes.helpers import assert_matches, provenance_of, run_pass


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, padding: int | None = None) -> nn.Sequential:
    padding = k // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    """RepVGG / MobileOne training-time block: k x k branches, a 1 x 1 branch and an identity BN."""

    def __init__(self, channels: int = 8, groups: int = 1, kxk_branches: int = 1, identity: bool = True) -> None:
        super().__init__()
        self.kxk = nn.ModuleList(conv_bn(channels, channels, 3, groups=groups) for _ in range(kxk_branches))
        self.scale = conv_bn(channels, channels, 1, groups=groups)
        self.identity = nn.BatchNorm2d(channels) if identity else None

    def forward(self, x):
        out = self.scale(x)
        for branch in self.kxk:
            out = out + branch(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class DifferenceBlock(nn.Module):
    """FastViT's RepMixer shape: x + scale * (conv(x) - norm(x))."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.mixer = conv_bn(channels, channels, 3, groups=channels)
        self.norm = nn.BatchNorm2d(channels)
        self.layer_scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


def _default(model: nn.Module, x: torch.Tensor):
    return fxcompress.compile(model, (x,), "default")


@pytest.mark.parametrize("block", [RepBlock(), RepBlock(groups=8), RepBlock(kxk_branches=3), RepBlock(identity=False)],
                         ids=["repvgg", "depthwise", "mobileone-k3", "no-identity"])
def test_default_merges_a_block_into_one_conv(block):
    model = randomize_bn(nn.Sequential(block, nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 8, 10, 10)
    result = _default(model, x)
    ops = op_histogram(result.module)
    assert ops["aten.conv2d"] == 2, ops  # the block's one conv and the head
    assert ops["aten.batch_norm"] == 0 and ops["aten.add"] + ops["aten.add_"] == 0, ops
    assert_matches(model, result.module, x, tol=1e-5)


def test_difference_and_residual_become_one_depthwise_conv():
    model = randomize_bn(DifferenceBlock()).eval()
    x = torch.randn(1, 8, 12, 12)
    result = _default(model, x)
    ops = op_histogram(result.module)
    assert ops == {"aten.conv2d": 1}, ops
    assert_matches(model, result.module, x, tol=1e-5)


def test_pass_alone_structure_provenance_idempotence():
    model = randomize_bn(RepBlock(kxk_branches=2)).eval()
    x = torch.randn(1, 8, 9, 9)
    gm = fxcompress.compile(model, (x,), ["fold-batchnorm"]).module  # each branch a plain conv, BN identity left
    result = run_pass("merge-parallel-convs", gm)  # also asserts a second run changes nothing
    assert result.modified and result.stats["merged"] == 3  # (1x1 + 3x3) + 3x3 + identity BN
    merged = [n for n in provenance_of(result.graph_module, "merge-parallel-convs") if n.op == "call_function"]
    assert len(merged) == 1 and tuple(merged[0].args[1].meta["val"].shape) == (8, 8, 3, 3)
    assert_matches(model, result.graph_module, x, tol=1e-5)


class TwoUses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.a(x)
        return a + self.b(x), a * 2


class MixedGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class EvenKernels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 2), nn.Conv2d(4, 4, 2)

    def forward(self, x):
        return self.a(x) + self.b(x)


class WeightAsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x, w):
        return nn.functional.conv2d(x, w, padding=1) + self.b(x)


@pytest.mark.parametrize("model, inputs, reason", [
    (TwoUses(), (torch.randn(1, 4, 6, 6),), "also used by"),
    (MixedGroups(), (torch.randn(1, 4, 6, 6),), "differ in stride, dilation or groups"),
    (EvenKernels(), (torch.randn(1, 4, 6, 6),), "even kernel size"),
    (WeightAsInput(), (torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)), "weight"),
], ids=["other-user", "groups", "even-kernel", "weight-input"])
def test_refusals_are_rejections_with_reasons(model, inputs, reason):
    gm = capture(model.eval(), inputs)
    result = run_pass("merge-parallel-convs", gm)
    assert not result.modified
    assert any(reason in r.reason for r in result.rejections), [r.reason for r in result.rejections]
    assert_matches(model, result.graph_module, *inputs, tol=0)


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8"])
def test_timm_reparameterizable_models_match_the_peer(name):
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name)).eval()
    x = torch.randn(1, 3, 64, 64)
    result = _default(model, x)
    peer = capture(reparameterize_model(copy.deepcopy(model)), (x,))
    ours = op_histogram(result.module)
    assert ours["aten.conv2d"] <= op_histogram(peer)["aten.conv2d"], ours
    if name != "fastvit_t8":  # FastViT keeps the batch norms of its attention-free MLPs in both
        assert ours["aten.batch_norm"] == 0, ours
    assert sum(1 for r in result.report.records if r.name == "merge-parallel-convs" and r.modified) >= 1
    with torch.no_grad():
        reference = model(x)
        error = (result.module(x) - reference).abs().max() / reference.abs().max()
    assert error < 1e-5
