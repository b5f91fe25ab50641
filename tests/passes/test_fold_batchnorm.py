"""fold-batchnorm (batch norm and per-channel affines into layers), and the default preset around it:
structure, applied once + idempotence, numerics, and a negative case per rejection."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.analysis.graph_stats import op_histogram as ops
from fxcompress.capture import capture
from fxcompress.graph_meta import PROVENANCE_KEY as PROVENANCE
from fxcompress.passes.cleanup import EliminateDeadCodePass
from fxcompress.passes.fold_batchnorm import TRAINING_MODE
from fxcompress.passes.presets import default
from tests.models import ConvBnRelu, Residual, randomize_bn
from tests.passes.helpers import drift, outputs_signature, prepared, reasons, run_pass

aten = torch.ops.aten


def test_fold_batchnorm_residual_structure_numerics_idempotence():
    x = torch.randn(2, 3, 8, 8)
    model, gm = prepared(Residual(), x)
    before, signature = ops(gm), outputs_signature(gm)
    result = run_pass("fold-batchnorm", gm)
    after = ops(result.graph_module)
    assert result.modified and result.stats["folded"] == 3 and result.rejections == []
    assert before["aten.batch_norm"] == 3 and after["aten.batch_norm"] == 0
    assert after["aten.conv2d"] == before["aten.conv2d"] == 3
    assert outputs_signature(result.graph_module) == signature
    assert drift(model, result.graph_module, x) <= 1e-5


def test_fold_batchnorm_meta_provenance_and_new_parameters():
    x = torch.randn(1, 3, 8, 8)
    model, gm = prepared(ConvBnRelu(), x)
    old_weight = gm.get_submodule("conv").weight
    old_copy = old_weight.detach().clone()
    bn_val = next(n for n in gm.graph.nodes if n.target is aten.batch_norm.default).meta["val"]
    result = run_pass("fold-batchnorm", gm)
    conv = next(n for n in result.graph_module.graph.nodes if n.target is aten.conv2d.default)
    assert conv.meta["val"] is bn_val
    assert conv.meta["nn_module_stack"] and list(conv.meta["nn_module_stack"].values())[-1][0] == "conv"
    assert conv.meta[PROVENANCE] == {"pass": "fold-batchnorm", "from": ["conv2d", "batch_norm"]}
    weight_node, bias_node = conv.args[1], conv.args[2]
    assert weight_node.op == bias_node.op == "get_attr"
    assert weight_node.meta["val"].shape == old_copy.shape and bias_node.meta["val"].shape == (8,)
    new_weight = result.graph_module.get_parameter(str(weight_node.target))
    assert isinstance(new_weight, nn.Parameter) and new_weight is not old_weight
    torch.testing.assert_close(old_weight, old_copy, rtol=0, atol=0)  # the old tensor was not written
    # nothing reads the old conv/bn state any more, so dead-code elimination shrinks the state_dict
    state_before = set(result.graph_module.state_dict())
    EliminateDeadCodePass()(result.graph_module)
    result.graph_module.recompile()
    dropped = state_before - set(result.graph_module.state_dict())
    assert {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"} <= dropped
    assert drift(model, result.graph_module, x) <= 1e-5


def _conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    return nn.Sequential(conv, bn)


LAYERS = {
    "conv1d": (lambda: _conv_bn(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)), (2, 4, 10)),
    "conv2d-no-bias": (lambda: _conv_bn(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6)), (2, 4, 7, 7)),
    "conv2d-grouped": (lambda: _conv_bn(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 7, 7)),
    "conv2d-depthwise": (lambda: _conv_bn(nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6)), (1, 6, 5, 5)),
    "conv2d-same-padding": (lambda: _conv_bn(nn.Conv2d(4, 6, 3, padding="same"), nn.BatchNorm2d(6)), (1, 4, 5, 5)),
    "conv3d": (lambda: _conv_bn(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), (1, 3, 5, 5, 5)),
    "conv-transpose1d": (lambda: _conv_bn(nn.ConvTranspose1d(4, 6, 3), nn.BatchNorm1d(6)), (2, 4, 5)),
    "conv-transpose2d-grouped": (
        lambda: _conv_bn(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6)),
        (2, 4, 5, 5),
    ),
    "conv-transpose3d": (lambda: _conv_bn(nn.ConvTranspose3d(2, 4, 2), nn.BatchNorm3d(4)), (1, 2, 3, 3, 3)),
    "linear": (lambda: _conv_bn(nn.Linear(5, 6), nn.BatchNorm1d(6)), (3, 5)),
    "bn-without-affine": (lambda: _conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), (1, 3, 4, 4)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fold_batchnorm_layer_kinds(kind):
    build, shape = LAYERS[kind]
    x = torch.randn(*shape)
    model, gm = prepared(build(), x)
    result = run_pass("fold-batchnorm", gm)
    assert result.stats["folded"] == 1, result.rejections
    assert ops(result.graph_module)["aten.batch_norm"] == 0
    assert drift(model, result.graph_module, x) <= 1e-5


def test_fold_batchnorm_leaves_user_model_unchanged():
    def digest(module: nn.Module) -> str:
        h = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    model = randomize_bn(Residual()).eval()
    before = digest(model)
    gm = capture(model, (torch.randn(1, 3, 8, 8),))
    run_pass("fold-batchnorm", gm)
    EliminateDeadCodePass()(gm)
    assert digest(model) == before
    assert not model.training


class TrainingModeBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.batch_norm(self.conv(x), None, None, training=True)


class ConvOutputReused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv module applied twice, each time followed by its own batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class ComputedBnParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma * 2, self.beta, training=False)


class ComputedConvWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight * 0.5))


def _shared(reader: str) -> str:
    return f"conv weight 'conv.weight' is also read by '{reader}'; rewriting it would duplicate the tensor instead of " \
        "replacing it"


# case -> (model, input shape, the rejection reasons expected)
BN_REJECTIONS = {
    "training-mode": (TrainingModeBn, (2, 3, 6, 6), [TRAINING_MODE]),
    "conv-output-reused": (
        ConvOutputReused, (1, 3, 6, 6), ["output of 'conv2d' is also used by 'add'; folding would change what they see"]
    ),
    "shared-conv-weight": (SharedConv, (1, 4, 6, 6), [_shared("conv2d_1"), _shared("conv2d")]),
    "computed-bn-weight": (
        ComputedBnParams, (1, 3, 4, 4), ["batch norm weight is computed at run time by 'mul', not a constant"]
    ),
    "computed-conv-weight": (
        ComputedConvWeight, (1, 3, 4, 4), ["conv weight is computed at run time by 'mul', not a constant"]
    ),
    # linear on [N, L, C] puts features last; BatchNorm1d(L) normalizes dim 1
    "linear-features-are-not-bn-channels": (
        lambda: _conv_bn(nn.Linear(4, 6), nn.BatchNorm1d(5)), (2, 5, 4),
        ["batch norm normalizes dim 1 but 'linear' puts its output channels on dim 2"],
    ),
}


@pytest.mark.parametrize("case", sorted(BN_REJECTIONS))
def test_fold_batchnorm_rejections(case):
    build, shape, expected = BN_REJECTIONS[case]
    x = torch.randn(*shape)
    model, gm = prepared(build(), x)
    batch_norms = ops(gm)["aten.batch_norm"]
    result = run_pass("fold-batchnorm", gm)
    assert not result.modified and ops(gm)["aten.batch_norm"] == batch_norms
    assert reasons(result) == expected
    assert {r.rule for r in result.rejections} == {"batchnorm-into-layer"}
    assert drift(model, gm, x) == 0


class ConvAffine(nn.Module):
    """conv * per-channel scale + per-channel shift, then scalar ops, then a linear with an affine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5, bias=False)
        self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(4, 1, 1))
        self.register_buffer("fc_scale", torch.rand(5) + 0.5)

    def forward(self, x):
        y = (self.conv(x) * self.scale + self.shift) / 2.0 - 1.0
        y = 3.0 - y  # c - layer: scale -1
        return self.fc(y.mean((2, 3))) * self.fc_scale


def test_fold_channel_affine_structure_numerics():
    x = torch.randn(2, 3, 6, 6)
    model, gm = prepared(ConvAffine(), x)
    result = run_pass("fold-batchnorm", gm)
    assert result.stats["folded"] == 0 and result.stats["affine_folded"] == 6
    after = ops(result.graph_module)
    assert after["aten.mul"] == after["aten.add"] == after["aten.div"] == after["aten.sub"] == 0
    conv = next(n for n in result.graph_module.graph.nodes if n.target is aten.conv2d.default)
    assert conv.meta[PROVENANCE]["from"] == ["conv2d", "mul", "add", "div", "sub", "rsub"]
    assert drift(model, result.graph_module, x) <= 1e-5
    assert not run_pass("fold-batchnorm", gm, fold_affine=False).modified


class NotPerChannel(nn.Module):
    def __init__(self, divide: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.divide = divide
        self.register_buffer("spatial", torch.rand(4, 1) + 0.5)
        self.register_buffer("zeros", torch.tensor([1.0, 0.0, 2.0, 3.0]).view(4, 1, 1))

    def forward(self, x):
        return self.conv(x) / self.zeros if self.divide else self.conv(x) * self.spatial


def test_fold_channel_affine_rejections():
    x = torch.randn(1, 3, 4, 4)
    _, gm = prepared(NotPerChannel(), x)
    result = run_pass("fold-batchnorm", gm)
    assert not result.modified
    assert reasons(result) == [
        "constant of shape [4, 1] does not broadcast along 'conv2d''s output channels (dim 1) only"
    ]
    assert result.rejections[0].rule == "channel-affine-into-layer"
    _, gm = prepared(NotPerChannel(divide=True), x)
    result = run_pass("fold-batchnorm", gm)
    assert reasons(result) == ["divisor has zeros: folding 1/0 into the weights would turn infinities into NaNs"]


def test_default_preset_runs_fusion_before_cleanup():
    names = [step.name for step in default().steps]
    for fusion in ("fold-batchnorm", "fuse-linear-chains", "collapse-reshapes"):
        assert names.index(fusion) < names.index("remove-no-ops") < names.index("eliminate-dead-code")
    assert "mark-fused-activations" in names
    x = torch.randn(2, 3, 8, 8)
    model, gm = prepared(Residual(), x)
    out = default().build()(gm).graph_module
    assert ops(out)["aten.batch_norm"] == 0
    assert not any(name.startswith(("bn0.", "bn1.", "bn2.")) for name in out.state_dict())
    assert drift(model, out, x) <= 1e-5


def _torchvision_fold(name: str, size: int) -> tuple[dict, dict, float]:
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
    x = torch.randn(1, 3, size, size)
    gm = capture(model, (x,))
    before = ops(gm)
    result = run_pass("fold-batchnorm", gm)
    assert result.rejections == []
    return before, ops(result.graph_module), drift(model, result.graph_module, x)


def test_resnet18_folds_every_batchnorm():
    before, after, worst = _torchvision_fold("resnet18", 64)
    assert before["aten.batch_norm"] == 20 and after["aten.batch_norm"] == 0
    assert after["aten.conv2d"] == 20
    assert worst <= 1e-4


@pytest.mark.slow
def test_mobilenet_v2_folds_every_batchnorm():
    before, after, worst = _torchvision_fold("mobilenet_v2", 96)
    assert before["aten.batch_norm"] == 52 and after["aten.batch_norm"] == 0
    assert worst <= 1e-4
