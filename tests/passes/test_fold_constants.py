"""fold-constants: structure, modified + idempotence, numerics, and negative cases."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from fxcompress.graph_meta import PROVENANCE_KEY
from fxcompress.passes.cleanup import EliminateDeadCodePass
from tests.passes.helpers import assert_matches, provenance_of, run_pass

aten = torch.ops.aten


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


class ConstantArithmetic(nn.Module):
    """A weight transpose and mask arithmetic on buffers: both computed once at compile time."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.register_buffer("positions", torch.arange(8))

    def forward(self, x):
        scale = (self.positions.float() * 0.5 + 1.0).unsqueeze(0)
        return (x @ self.w.t()) * scale


class Growth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("small", torch.randn(4))

    def forward(self, x):
        return x + (self.small * 2).expand(128, 64, 4)  # 128 KiB from 16 bytes


class RandomAndMutated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("c", torch.ones(4))

    def forward(self, x):
        t = self.c * 2
        t.add_(x.mean())  # t is written with input data: not a constant
        return x + t + torch.rand(4) * 0


class FakeQuantizedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        weight = torch.fake_quantize_per_tensor_affine(self.fc.weight, 0.05, 0, -128, 127)
        return torch.nn.functional.linear(x, weight, self.fc.bias)


class ConstantOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("c", torch.ones(4))

    def forward(self, x):
        return x + 1, self.c * 3


def test_fold_constants_structure_numerics_and_state():
    model, x = ConstantArithmetic().eval(), torch.randn(2, 6)
    gm = run_pass("remove-guards", capture(model, (x,))).graph_module  # the dtype assert reads `positions`
    result = run_pass("fold-constants", gm)
    assert result.modified and result.stats["folded"] == 2 and result.stats["growth_limited"] == 0
    after = ops(result.graph_module)
    assert set(after) == {"aten.matmul", "aten.mul"}  # transpose and mask arithmetic are gone
    folded = provenance_of(result.graph_module, "fold-constants")
    assert len(folded) == 2 and all(n.op == "get_attr" for n in folded)
    for node in folded:
        val = node.meta["val"]
        assert isinstance(val, FakeTensor) and val.device.type == "cpu"
        assert tuple(val.shape) == tuple(getattr(result.graph_module, node.target).shape)
        assert node.meta[PROVENANCE_KEY]["from"]
    assert_matches(model, result.graph_module, x)
    cleaned = EliminateDeadCodePass()(result.graph_module).graph_module
    names = set(cleaned.state_dict())
    assert "w" not in names and "positions" not in names and len(names) == 2


def test_fold_constants_respects_growth_limit():
    model, x = Growth().eval(), torch.randn(128, 64, 4)
    result = run_pass("fold-constants", capture(model, (x,)))
    assert result.stats["growth_limited"] == 1 and result.stats["folded"] == 1  # small * 2, not the expand
    assert ops(result.graph_module)["aten.expand"] == 1 and ops(result.graph_module)["aten.mul"] == 0
    assert any("max_growth" in r.reason for r in result.rejections)
    assert_matches(model, result.graph_module, x)
    relaxed = run_pass("fold-constants", capture(model, (x,)), always_fold_bytes=1 << 20)
    assert ops(relaxed.graph_module)["aten.expand"] == 0


def test_fold_constants_folds_nested_cones_below_growth_limits():
    class TwoExpands(Growth):
        def forward(self, x):
            a = self.small * 2
            c = a + 1  # folded after `a`, which it reads: its cone then holds a's new buffer
            return x + a.expand(128, 64, 4) + c.expand(128, 64, 4)

    model, x = TwoExpands().eval(), torch.randn(128, 64, 4)
    result = run_pass("fold-constants", capture(model, (x,)))
    assert result.stats["growth_limited"] == 2 and result.stats["folded"] == 2
    assert ops(result.graph_module)["aten.expand"] == 2 and ops(result.graph_module)["aten.mul"] == 0
    assert_matches(model, result.graph_module, x)


def test_fold_constants_skips_random_mutated_and_quantized_values():
    gm = capture(RandomAndMutated().eval(), (torch.randn(3, 4),))
    result = run_pass("fold-constants", gm)
    assert not result.modified
    after = ops(result.graph_module)
    assert after["aten.rand"] == 1 and after["aten.add_"] == 1
    quantized = run_pass("fold-constants", capture(FakeQuantizedWeight().eval(), (torch.randn(2, 4),)))
    assert not quantized.modified  # the exporter needs the fake-quantize to emit Q/DQ


def test_fold_constants_keeps_parameters_when_asked_and_outputs():
    model, x = ConstantArithmetic().eval(), torch.randn(2, 6)
    result = run_pass("fold-constants", capture(model, (x,)), fold_parameters=False)
    assert result.stats["folded"] == 1 and ops(result.graph_module)["aten.t"] == 1
    out = run_pass("fold-constants", capture(ConstantOutput().eval(), (x[:, :4],)))
    assert not out.modified and ops(out.graph_module)["aten.mul"] == 1
