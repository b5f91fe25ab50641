"""remove-zero-branches: structure, modified + idempotence, numerics, and negative cases."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from fxcompress.graph_meta import PROVENANCE_KEY
from fxcompress.infra.recipe import resolve_recipe
from fxcompress.passes.cleanup import EliminateDeadCodePass
from tests.passes.helpers import assert_matches, run_pass

aten = torch.ops.aten


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


def _zero(module: nn.Module, bias: bool = True) -> nn.Module:
    with torch.no_grad():
        module.weight.zero_()
        if bias and module.bias is not None:
            module.bias.zero_()
    return module


class ZeroLinearBranch(nn.Module):
    def __init__(self, zero_bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = _zero(nn.Linear(8, 8), bias=zero_bias)

    def forward(self, x):
        return self.a(x) + torch.relu(self.b(x))


class ZeroConvInCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.live = nn.Conv2d(3, 4, 3, padding=1)
        self.dead = _zero(nn.Conv2d(3, 4, 3, padding=1))
        self.register_buffer("mask", torch.zeros(1, 8, 1, 1))

    def forward(self, x):
        y = torch.cat([self.live(x), self.dead(x).relu()], dim=1)
        return y, self.live(x) * self.mask[:, :4]


class ZeroResidual(nn.Module):
    """torchvision-style in-place residuals: ``out += identity`` around a zero branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.dead = _zero(nn.Conv2d(4, 4, 3, padding=1, bias=False))

    def forward(self, x):
        z = torch.relu_(self.dead(x))
        y = self.conv(x)
        y += z  # y + 0: y unchanged
        out = self.dead(y)
        out += y  # 0 + y: a fresh copy of y, written by relu_ below
        return torch.relu_(out)


def test_remove_zero_branches_drops_zero_linear_from_sum():
    model, x = ZeroLinearBranch().eval(), torch.randn(2, 8)
    gm = capture(model, (x,))
    result = run_pass("remove-zero-branches", gm)
    assert result.modified and result.stats["absorbed"] == 1
    after = ops(result.graph_module)
    assert after["aten.linear"] == 1 and after["aten.relu"] == 0 and after["aten.add"] == 0
    assert_matches(model, result.graph_module, x, tol=0.0)
    cleaned = EliminateDeadCodePass()(result.graph_module).graph_module
    assert not any(name.startswith("b.") for name in cleaned.state_dict())


def test_remove_zero_branches_replaces_zero_conv_and_zero_product():
    model, x = ZeroConvInCat().eval(), torch.randn(1, 3, 8, 8)
    gm = capture(model, (x,))
    result = run_pass("remove-zero-branches", gm)
    assert result.stats["zero_branches"] == 2
    after = ops(result.graph_module)
    assert after["aten.zeros"] == 2 and after["aten.relu"] == 0 and after["aten.mul"] == 0
    zeros = [n for n in result.graph_module.graph.nodes if n.target is aten.zeros.default]
    assert sorted(tuple(n.meta["val"].shape) for n in zeros) == [(1, 4, 8, 8), (1, 4, 8, 8)]
    assert all(n.meta[PROVENANCE_KEY]["pass"] == "remove-zero-branches" for n in zeros)
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_remove_zero_branches_with_in_place_residuals():
    model, x = ZeroResidual().eval(), torch.randn(1, 4, 6, 6)
    gm = capture(model, (x,))
    result = run_pass("remove-zero-branches", gm)
    assert result.stats["absorbed"] == 2
    after = ops(result.graph_module)
    assert after["aten.conv2d"] == 1 and after["aten.add_"] == 0
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_remove_zero_branches_prunes_dead_attention():
    class ZeroHead(nn.Module):  # torchvision's ViT head is initialised to zeros like this
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)
            self.head = _zero(nn.Linear(4, 3))

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1))

    model, x = ZeroHead().eval(), torch.randn(2, 5, 4)
    result = run_pass("remove-zero-branches", capture(model, (x,)))
    # SDPA is tagged random by torch; without dropout it is pure and goes with the dead branch.
    assert set(ops(result.graph_module)) == {"aten.zeros", "call_module:_guards_fn"}
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_remove_zero_branches_keeps_nonzero_branches():
    model, x = ZeroLinearBranch(zero_bias=False).eval(), torch.randn(2, 8)
    result = run_pass("remove-zero-branches", capture(model, (x,)))
    assert not result.modified and ops(result.graph_module)["aten.linear"] == 2
    product = run_pass("remove-zero-branches", capture(ZeroConvInCat().eval(), (torch.randn(1, 3, 8, 8),)),
                       multiply_by_zero=False)
    assert ops(product.graph_module)["aten.mul"] == 1


# --------------------------------------------------------------------------------------- pipeline


def test_default_preset_runs_dead_branch_passes_in_order():
    names = [s.name for s in resolve_recipe("default").steps]
    expected = ["remove-guards", "fold-constants", "simplify-algebra", "remove-no-ops",
                "remove-zero-branches", "eliminate-common-subexpressions", "eliminate-dead-code"]
    assert [n for n in names if n in expected] == expected
    model, x = ZeroLinearBranch().eval(), torch.randn(2, 8)
    gm = capture(model, (x,))
    out = resolve_recipe("default").build()(gm).graph_module
    assert set(ops(out)) == {"aten.linear"}
    assert_matches(model, out, x)
