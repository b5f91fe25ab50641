"""fuse-linear-chains (linear -> linear, matmul + bias as linear):
structure, applied once + idempotence, numerics, and a negative case per rejection."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from fxcompress.analysis.graph_stats import op_histogram as ops
from fxcompress.capture import capture
from fxcompress.graph_meta import PROVENANCE_KEY as PROVENANCE
from fxcompress.passes.cleanup import EliminateDeadCodePass
from tests.models import LinearChain as Chain
from tests.passes.helpers import drift, reasons, run_pass

aten = torch.ops.aten


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
