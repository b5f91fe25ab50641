"""eliminate-common-subexpressions: structure, modified + idempotence, numerics, and negative cases."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from tests.passes.helpers import assert_matches, run_pass

aten = torch.ops.aten


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


class Repeated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, y):
        a = torch.relu(self.fc(x))
        b = torch.relu(self.fc(x))
        return a + b + x * y + y * x


class ReadWriteRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        row = h[0]
        first = row.sin()
        h.add_(1)  # writes row through its base
        second = row.sin()
        noise = torch.rand_like(x) * 0 + torch.rand_like(x) * 0
        return first + second + noise


def test_cse_merges_identical_pure_ops():
    model, x, y = Repeated().eval(), torch.randn(2, 6), torch.randn(2, 6)
    gm = capture(model, (x, y))
    assert ops(gm)["aten.linear"] == 2
    result = run_pass("eliminate-common-subexpressions", gm)
    assert result.modified and result.stats["merged"] == 3  # linear, relu, and y * x
    after = ops(result.graph_module)
    assert after["aten.linear"] == 1 and after["aten.relu"] == 1 and after["aten.mul"] == 1
    assert_matches(model, result.graph_module, x, y)


def test_cse_merges_attention_without_dropout():
    class TwiceAttention(nn.Module):
        def forward(self, q, k, v):
            sdpa = torch.nn.functional.scaled_dot_product_attention
            return sdpa(q, k, v) + sdpa(q, k, v)

    model, inputs = TwiceAttention(), tuple(torch.randn(1, 2, 5, 4) for _ in range(3))
    result = run_pass("eliminate-common-subexpressions", capture(model, inputs))
    assert result.stats["merged"] == 1 and ops(result.graph_module)["aten.scaled_dot_product_attention"] == 1
    assert_matches(model, result.graph_module, *inputs)


def test_cse_leaves_written_and_random_values():
    model, x = ReadWriteRead().eval(), torch.randn(2, 6)
    gm = capture(model, (x,))
    result = run_pass("eliminate-common-subexpressions", gm)
    after = ops(result.graph_module)
    assert after["aten.sin"] == 2 and after["aten.rand_like"] == 2
    torch.manual_seed(0)
    assert_matches(model, result.graph_module, x)
