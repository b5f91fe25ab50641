"""equalize-attention: query/value rows balanced, key/output projection compensate; exact in float,
one weight scale for the balanced layers in int8-dynamic, and no per-column Mul in their export."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.passes.equalize_attention import EqualizeAttentionPass
from fxcompress.graph_meta import layer_name
from fxcompress.passes.quantize_dynamic import QuantizeInt8DynamicPass
from fxcompress.rewrite.matchers import attribute


class Attention(nn.Module):
    """One multi-head self-attention block (eager matmuls or sdpa) with uneven trained-like row ranges."""

    def __init__(self, hidden: int = 32, heads: int = 4, sdpa: bool = False, scramble_key: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.heads, self.sdpa, self.scramble_key = heads, sdpa, scramble_key
        with torch.no_grad():  # rows of very different ranges, as in trained projections
            for layer in (self.q, self.k, self.v, self.o):
                layer.weight.mul_(torch.logspace(-1, 1, hidden).reshape(-1, 1)[torch.randperm(hidden)])

    def forward(self, x):
        b, s, c = x.shape
        split = lambda t: t.view(b, s, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        k = self.k(x)
        if self.scramble_key:  # a channel order the query does not share: nothing may be folded across it
            k = k.flip(-1)
        q, k, v = split(self.q(x)), split(k), split(self.v(x))
        if self.sdpa:
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * (c // self.heads) ** -0.5
            ctx = torch.matmul(scores.softmax(-1), v)
        return x + self.o(ctx.transpose(1, 2).contiguous().reshape(b, s, c))


def _compile(model, *passes):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32)
    return x, fxcompress.compile(model.eval(), (x,), list(passes))


@pytest.mark.parametrize("sdpa", [False, True])
def test_structure_balances_query_and_value_rows(sdpa):
    torch.manual_seed(0)
    model = Attention(sdpa=sdpa)
    _, result = _compile(model, EqualizeAttentionPass())
    stats = result.report.records[0].stats
    assert sorted((e["kind"], e["scaled"], e["partner"]) for e in stats["equalized"]) == [
        ("query-key", "q", "k"), ("value-output", "v", "o")]
    gm = result.module
    weights = {layer_name(n): attribute(gm, n.args[1].target) for n in gm.graph.nodes
               if n.target is torch.ops.aten.linear.default}
    for name in ("q", "v"):
        rows = weights[name].abs().amax(dim=1)
        assert float((rows.max() - rows.min()) / rows.max()) < 1e-6, name
    layers = QuantizeInt8DynamicPass()(gm).stats["layers"]
    assert Counter(layer["weight_scale"] for layer in layers) == Counter({"per-tensor": 2, "per-channel": 2})


@pytest.mark.parametrize("sdpa", [False, True])
def test_numerical_parity_and_idempotence(sdpa):
    torch.manual_seed(0)
    model = Attention(sdpa=sdpa)
    x, result = _compile(model, EqualizeAttentionPass())
    with torch.no_grad():
        assert torch.allclose(result.module(x), model(x), rtol=1e-5, atol=1e-5)
    assert not EqualizeAttentionPass()(result.module).modified


def test_query_key_half_keeps_the_int8_integers():
    """Balancing q against k changes no int8 integer: the dynamic-int8 module computes the same outputs."""
    torch.manual_seed(0)
    model = Attention()
    x, plain = _compile(model, QuantizeInt8DynamicPass())
    _, balanced = _compile(model, EqualizeAttentionPass(value_output=False), QuantizeInt8DynamicPass())
    with torch.no_grad():
        assert torch.allclose(balanced.module(x), plain.module(x), rtol=1e-4, atol=1e-4)


def test_channel_order_not_shared_is_left_alone():
    torch.manual_seed(0)
    _, result = _compile(Attention(scramble_key=True), EqualizeAttentionPass())
    record = result.report.records[0]
    assert [e["kind"] for e in record.stats["equalized"]] == ["value-output"]
    assert any("key" in r.reason for r in record.rejections)


def test_balanced_layers_export_without_the_column_ratio_mul(tmp_path):
    torch.manual_seed(0)
    model = Attention()
    x, plain = _compile(model, QuantizeInt8DynamicPass())
    _, balanced = _compile(model, EqualizeAttentionPass(), QuantizeInt8DynamicPass())
    counts = []
    for name, result in (("plain", plain), ("balanced", balanced)):
        path = result.export_onnx(tmp_path / f"{name}.onnx")
        assert result.report.parity.drift < 1e-3  # the file computes what the module does
        counts.append(Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Mul"])
    assert counts[0] - counts[1] == 2  # q's and v's ratio Muls are gone
