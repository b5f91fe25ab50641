"""Fusion passes: structure, applied once + idempotence, numerics, and a negative case per rejection."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from fxcompress.graph_meta import PROVENANCE_KEY as PROVENANCE
from fxcompress.numerics import compare_outputs, flatten_outputs, worst_drift
from fxcompress.passes.cleanup import EliminateDeadCodePass
from fxcompress.graph_meta import FUSED_ACTIVATION, FUSED_INTO
from fxcompress.passes.fuse import TRAINING_MODE
from fxcompress.passes.presets import default
from tests.models import ConvBnRelu, Residual, randomize_bn
from tests.passes.helpers import run_pass

aten = torch.ops.aten


def drift(model: nn.Module, gm: fx.GraphModule, *inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return worst_drift(compare_outputs(flatten_outputs(model(*inputs)), flatten_outputs(gm(*inputs))))


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


def reasons(result) -> list[str]:
    return [r.reason for r in result.rejections]


def outputs_signature(gm: fx.GraphModule) -> list[tuple]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [(tuple(a.meta["val"].shape), a.meta["val"].dtype) for a in out.args[0]]


def prepared(model: nn.Module, *inputs: torch.Tensor) -> tuple[nn.Module, fx.GraphModule]:
    model = randomize_bn(model).eval()
    return model, capture(model, inputs)


# --- fold-batchnorm ---------------------------------------------------------------------------------

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


# --- fuse-linear-chains -------------------------------------------------------------------------------

class Chain(nn.Module):
    def __init__(self, *widths: int, act: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))
        self.act = act

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.act and i == 0:
                x = torch.relu(x)
        return x


@pytest.mark.parametrize("bias", [True, False])
def test_fuse_linear_chain_structure_numerics(bias):
    x = torch.randn(3, 7, 16)
    model = Chain(16, 8, 6, 4, bias=bias).eval()
    gm = capture(model, (x,))
    params_before = sum(p.numel() for p in gm.parameters())
    result = run_pass("fuse-linear-chains", gm)
    assert result.stats["chains_fused"] == 2 and ops(result.graph_module)["aten.linear"] == 1
    linear = next(n for n in result.graph_module.graph.nodes if n.target is aten.linear.default)
    assert linear.meta[PROVENANCE] == {"pass": "fuse-linear-chains", "from": ["linear", "linear_1", "linear_2"]}
    assert drift(model, result.graph_module, x) <= 1e-5
    EliminateDeadCodePass()(result.graph_module)
    result.graph_module.recompile()
    assert sum(p.numel() for p in result.graph_module.parameters()) < params_before
    assert drift(model, result.graph_module, x) <= 1e-5


def test_fuse_linear_chain_rejects_bottleneck():
    gm = capture(Chain(32, 4, 32).eval(), (torch.randn(2, 32),))
    result = run_pass("fuse-linear-chains", gm)
    assert not result.modified
    assert reasons(result) == [
        "fusing 32 -> 4 -> 32 would cost 1024 MACs and 1056 parameters instead of 256 and 292"
    ]


def test_fuse_linear_chain_keeps_nonlinearity_and_shared_outputs():
    assert not run_pass("fuse-linear-chains", capture(Chain(8, 6, 4, act=True).eval(), (torch.randn(2, 8),))).modified

    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(h), h

    result = run_pass("fuse-linear-chains", capture(Tapped().eval(), (torch.randn(2, 8),)))
    assert not result.modified
    assert reasons(result) == ["output of 'linear' is also used by 'output'; fusing would change what they see"]


class MatmulBias(nn.Module):
    """The ways code writes a linear by hand: x @ W.t() + b, mm with .T, b + matmul, addmm with W stored [in, out]."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(6))
        self.w2, self.b2 = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6))
        self.w3, self.b3 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))  # [in, out]
        self.w4, self.b4 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))  # [in, out]

    def forward(self, x):
        y = torch.relu(x @ self.w1.t() + self.b1)
        y = torch.relu(self.b2 + torch.mm(y, self.w2.T))
        y = torch.relu(torch.addmm(self.b3, y, self.w3))
        return torch.matmul(y, self.w4) + self.b4


def test_matmul_bias_to_linear_structure_numerics():
    x = torch.randn(2, 5)
    model = MatmulBias().eval()
    gm = capture(model, (x,))
    result = run_pass("fuse-linear-chains", gm)
    assert result.stats["matmuls_to_linear"] == 4 and result.stats["chains_fused"] == 0
    after = ops(result.graph_module)
    assert after["aten.linear"] == 4
    assert after["aten.matmul"] == after["aten.mm"] == after["aten.addmm"] == after["aten.add"] == after["aten.t"] == 0
    assert drift(model, result.graph_module, x) <= 1e-5
    EliminateDeadCodePass()(result.graph_module)
    result.graph_module.recompile()
    # weights read through a transpose are reused as they are; [in, out] ones are replaced by transposed copies
    state = set(result.graph_module.state_dict())
    assert {"w1", "w2", "w3_t", "w4_t"} <= state and not {"w3", "w4"} & state
    assert drift(model, result.graph_module, x) <= 1e-5


def test_matmul_bias_rejections():
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            y = x @ self.w
            return y + self.b, y, x @ self.w + self.b

    result = run_pass("fuse-linear-chains", capture(Reused().eval(), (torch.randn(2, 4),)))
    assert reasons(result) == [
        "output of 'matmul' is also used by 'output'; rewriting it would change what they see",
        "matmul weight 'w' is also read by 'matmul'; rewriting it would duplicate the tensor instead of replacing it",
    ]
    assert not result.modified


def test_matmul_of_two_activations_is_not_a_candidate():
    class Attention(nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-1, -2) + 1.0

    result = run_pass("fuse-linear-chains", capture(Attention(), (torch.randn(2, 3, 4), torch.randn(2, 3, 4))))
    assert not result.modified and result.rejections == []


# --- mark-fused-activations ---------------------------------------------------------------------------

class Activations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        y = F.relu6(self.conv(x))
        z = self.conv2(y)
        y = F.relu(z) + z.sum()  # conv2's output feeds the activation and a sum: not fused
        h = F.gelu(self.fc1(y.mean((2, 3))))
        return torch.sigmoid(self.fc3(F.silu(self.fc2(h))))


def test_mark_fused_activations_annotates_only():
    x = torch.randn(1, 3, 6, 6)
    model = Activations().eval()
    gm = capture(model, (x,))
    code_before = gm.code
    result = run_pass("mark-fused-activations", gm)
    assert result.modified and result.stats["marked"] == 4
    assert result.graph_module.code == code_before
    marks = {n.name: n.meta[FUSED_ACTIVATION] for n in gm.graph.nodes if FUSED_ACTIVATION in n.meta}
    assert marks == {"conv2d": "relu6", "linear": "gelu", "linear_1": "silu", "linear_2": "sigmoid"}
    into = {n.name: n.meta[FUSED_INTO] for n in gm.graph.nodes if FUSED_INTO in n.meta}
    assert into == {v: k for k, v in marks.items()}
    assert reasons(result) == [
        "output of 'conv2d_1' is also used by 'sum_1'; the activation cannot run inside the layer"
    ]
    assert drift(model, gm, x) == 0


def test_mark_fused_activations_clears_stale_marks():
    x = torch.randn(2, 8)
    gm = capture(Chain(8, 6, 4, act=True).eval(), (x,))
    run_pass("mark-fused-activations", gm)
    linear = next(n for n in gm.graph.nodes if n.meta.get(FUSED_ACTIVATION))
    relu = next(n for n in gm.graph.nodes if n.meta.get(FUSED_INTO))
    with gm.graph.inserting_after(linear):  # a later rewrite puts something between them
        neg = gm.graph.call_function(aten.neg.default, (linear,))
    relu.replace_input_with(linear, neg)
    result = run_pass("mark-fused-activations", gm)
    assert result.modified and result.stats == {"marked": 0, "stale_cleared": 2}
    assert FUSED_ACTIVATION not in linear.meta and FUSED_INTO not in relu.meta


# --- collapse-reshapes ----------------------------------------------------------------------------------

class Views(nn.Module):
    def forward(self, x):
        a = x.unsqueeze(0).unsqueeze(0).squeeze(0).view(2, -1).flatten().reshape(4, 6)  # chain -> one reshape
        b = x.flatten(1).unflatten(1, (3, 4))  # round trip -> nothing
        c = x.permute(1, 2, 0).transpose(0, 1)  # composes to one permute
        d = x.transpose(1, 2).transpose(2, 1)  # cancels
        e = x.permute(0, 1, 2) * 2  # a lone identity permute
        return a, b + 1, c, d * 3, e


def test_collapse_reshapes_structure_numerics():
    x = torch.randn(2, 3, 4)
    model = Views()
    gm = capture(model, (x,))
    signature = outputs_signature(gm)
    result = run_pass("collapse-reshapes", gm)
    assert result.stats == {"reshape_chains": 2, "permute_chains": 3, "nodes_removed": 11}
    after = ops(result.graph_module)
    assert after["aten.reshape"] == 1 and after["aten.permute"] == 1
    assert sum(after[k] for k in ("aten.view", "aten.unsqueeze", "aten.squeeze", "aten.flatten",
                                  "aten.unflatten", "aten.transpose")) == 0
    reshape = next(n for n in result.graph_module.graph.nodes if n.target is aten.reshape.default)
    assert reshape.args[1] == [4, 6]
    assert reshape.meta[PROVENANCE]["from"] == ["unsqueeze", "unsqueeze_1", "squeeze", "view", "flatten", "reshape"]
    permute = next(n for n in result.graph_module.graph.nodes if n.target is aten.permute.default)
    assert permute.args[1] == [2, 1, 0] and tuple(permute.meta["val"].shape) == (4, 3, 2)
    assert outputs_signature(result.graph_module) == signature
    assert drift(model, result.graph_module, x) == 0
    assert not run_pass("collapse-reshapes", capture(model, (x,)), reshapes=False, permutes=False).modified


class SharedTranspose(nn.Module):
    def forward(self, x):
        t = x.transpose(1, 2)  # read twice: by the transpose that cancels it, and by the sum
        back = t.transpose(2, 1)
        return back * 2, t.sum(-1)


def test_collapse_reshapes_cancels_through_a_shared_permute():
    x = torch.randn(2, 3, 4)
    model = SharedTranspose()
    result = run_pass("collapse-reshapes", capture(model, (x,)))
    assert result.stats["permute_chains"] == 1
    after = ops(result.graph_module)
    assert after["aten.transpose"] == 1  # the shared one stays for the sum; `back` reads x itself
    mul = next(n for n in result.graph_module.graph.nodes if n.target is aten.mul.Tensor)
    assert mul.args[0].op == "placeholder"
    assert drift(model, result.graph_module, x) == 0
    merged = run_pass("collapse-reshapes", capture(model, (x,)), permutes=False)
    assert not merged.modified


def test_default_preset_cancels_permute_pairs():
    class Pairs(nn.Module):
        def forward(self, x):
            return torch.relu(x.permute(2, 0, 1).permute(1, 2, 0)) + x.transpose(0, 1).transpose(1, 0)

    x = torch.randn(2, 3, 4)
    model = Pairs()
    out = default().build()(capture(model, (x,))).graph_module
    assert not any(ops(out)[k] for k in ("aten.permute", "aten.transpose"))
    assert drift(model, out, x) == 0


def test_collapse_reshapes_respects_in_place_writes():
    class Mutated(nn.Module):
        def forward(self, x):
            y = x.clone()
            z = y.view(-1).unsqueeze(0)
            z.add_(1)  # writes through the views into y
            return y * 2

    x = torch.randn(2, 3)
    model = Mutated()
    gm = capture(model, (x,))
    result = run_pass("collapse-reshapes", gm)
    assert not result.modified
    assert reasons(result) == [
        "'add_' writes in place to a tensor of this chain; merging its views could change what it writes"
    ]
    assert drift(model, gm, x) == 0


def test_collapse_reshapes_rejects_dynamic_shapes():
    class Dyn(nn.Module):
        def forward(self, x):
            return x.unsqueeze(1).flatten(1) + 1

    gm = capture(Dyn(), (torch.randn(3, 4),), dynamic_batch=True)
    result = run_pass("collapse-reshapes", gm)
    assert not result.modified
    assert reasons(result) == ["the chain has dynamic (symbolic) shapes; only static reshapes are merged"]


# --- presets and model zoo ------------------------------------------------------------------------

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
