"""simplify-algebra: structure, modified + idempotence, numerics, and negative cases."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from tests.passes.helpers import assert_matches, run_pass

aten = torch.ops.aten


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("ones", torch.ones(8))
        self.register_buffer("zeros", torch.zeros(1, 8))

    def forward(self, x):  # x: [2, 4, 8]
        y = self.fc(x) * 1 + 0
        y = (y / 1 - 0) * self.ones + self.zeros
        y = torch.cat([y], dim=1)[:, 0:4]  # export writes the full slice as aten.alias
        y = torch.ops.aten.slice.Tensor(y, 1, 0, 2**63 - 1)
        y = y.transpose(1, 2).transpose(2, 1)
        y = y.permute(2, 0, 1).permute(1, 2, 0)
        return torch.relu(y)


class KeepsBroadcastAndMutation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("zeros", torch.zeros(3, 1, 8))

    def forward(self, x):  # x: [1, 4, 8]
        h = self.fc(x)
        widened = h + self.zeros  # broadcasts h to [3, 4, 8]: not an identity
        y = h + 0
        y.add_(1)  # y is written: replacing it by h would write h
        return widened * 2, y * h


class Attention(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        mask = torch.ones(5, 5, dtype=torch.bool)
        self.register_buffer("mask", torch.tril(mask) if causal else mask)

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[None, None])


def test_simplify_algebra_removes_identities():
    model, x = Identities().eval(), torch.randn(2, 4, 8)
    plain = run_pass("simplify-algebra", capture(model, (x,)))
    assert "no_ops" not in plain.stats and ops(plain.graph_module)["aten.alias"] == 1  # left to remove-no-ops
    result = run_pass("simplify-algebra", capture(model, (x,)), include_no_ops=True)
    assert result.modified
    assert result.stats["identities"] == 6 and result.stats["single_cats"] == 1 and result.stats["full_slices"] == 1
    assert result.stats["no_ops"] == 1
    # permutes that cancel are collapse-reshapes' job (one owner), not this pass's
    assert set(ops(result.graph_module)) == {"aten.linear", "aten.relu", "aten.transpose", "aten.permute",
                                             "call_module:_guards_fn"}
    assert_matches(model, result.graph_module, x, tol=0.0)
    collapsed = run_pass("collapse-reshapes", result.graph_module)
    assert set(ops(collapsed.graph_module)) == {"aten.linear", "aten.relu", "call_module:_guards_fn"}
    assert_matches(model, collapsed.graph_module, x, tol=0.0)


def test_simplify_algebra_in_place_identity_and_lone_operands():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            y.mul_(1)  # returns y itself: always an identity
            return y + torch.ones(3, 4) * 0 + 0.0

    model, x = InPlace(), torch.randn(3, 4)
    result = run_pass("simplify-algebra", capture(model, (x,)))
    assert result.stats["identities"] == 3  # mul_(1), + 0.0, and + (ones * 0): a constant cone worth 0
    after = ops(result.graph_module)
    assert after["aten.mul_"] == 0 and after["aten.add"] == 0 and after["aten.ones"] == 0
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_simplify_algebra_keeps_broadcasting_and_written_values():
    model, x = KeepsBroadcastAndMutation().eval(), torch.randn(1, 4, 8)
    result = run_pass("simplify-algebra", capture(model, (x,)))
    assert result.stats["identities"] == 0
    assert ops(result.graph_module)["aten.add"] == 2
    reasons = [r.reason for r in result.rejections]
    assert any("broadcasts" in r for r in reasons) and any("writes in place" in r for r in reasons)
    assert {r.rule for r in result.rejections} == {"identity"}
    assert_matches(model, result.graph_module, x)


def test_simplify_algebra_drops_attention_mask_that_masks_nothing():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    full = Attention(causal=False).eval()
    result = run_pass("simplify-algebra", capture(full, (q, k, v)))
    assert result.stats["attention_masks_dropped"] == 1
    sdpa = next(n for n in result.graph_module.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    assert len(sdpa.args) < 4 or sdpa.args[3] is None
    assert not [n for n in result.graph_module.graph.nodes if n.op == "get_attr"]
    assert_matches(full, result.graph_module, q, k, v)
    causal = Attention(causal=True).eval()
    kept = run_pass("simplify-algebra", capture(causal, (q, k, v)))
    assert kept.stats["attention_masks_dropped"] == 0
    assert_matches(causal, kept.graph_module, q, k, v)
