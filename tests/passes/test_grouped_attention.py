"""fold-repeat-kv: structure, idempotence, numerics, declined cases, and the opset-23 export."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import nn

from fxcompress.capture import capture
from fxcompress.export.onnx_export import export_model_proto
from fxcompress.runtime.session import create_session
from fxcompress.testing import check_numerics, check_structure
from tests.passes.helpers import run_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def repeat_kv(heads: torch.Tensor, group: int) -> torch.Tensor:
    """transformers' repeat_kv: [b, h, s, d] -> [b, h * group, s, d], each head ``group`` times in a row."""
    b, h, s, d = heads.shape
    return heads[:, :, None, :, :].expand(b, h, group, s, d).reshape(b, h * group, s, d)


class GroupedAttention(nn.Module):
    """8 query heads over 2 key/value heads, a boolean mask: Llama's attention core."""

    def __init__(self, key_group: int = 4, value_group: int = 4, also_return_keys: bool = False) -> None:
        super().__init__()
        self.key_group, self.value_group, self.also_return_keys = key_group, value_group, also_return_keys

    def forward(self, q, k, v, mask):
        keys = repeat_kv(k, self.key_group)
        out = nn.functional.scaled_dot_product_attention(q, keys, repeat_kv(v, self.value_group), attn_mask=mask)
        return (out, keys) if self.also_return_keys else out


def _inputs(kv_heads: int = 2, value_heads: int | None = None):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 3, 16, generator=generator)
    k = torch.randn(2, kv_heads, 7, 16, generator=generator)
    v = torch.randn(2, value_heads or kv_heads, 7, 16, generator=generator)
    mask = torch.ones(2, 1, 3, 7, dtype=torch.bool)
    mask[1, ..., :2] = False  # a left-padded row
    return q, k, v, mask


def test_repeated_heads_are_read_directly():
    model, inputs = GroupedAttention().eval(), _inputs()
    result = check_structure("fold-repeat-kv", model, inputs, disappear=[aten.expand.default, aten.unsqueeze.default],
                             counts={SDPA: 1})
    assert result.stats["attentions_grouped"] == 1
    (attention,) = [n for n in result.graph_module.graph.nodes if n.target is SDPA]
    assert attention.kwargs["enable_gqa"] is True and [a.name for a in attention.args[1:3]] == ["k", "v"]
    check_numerics("fold-repeat-kv", model, inputs, tolerance=1e-6)
    run_pass("fold-repeat-kv", capture(model, inputs))  # idempotent


def test_declines_uneven_repeats_and_shared_copies():
    uneven = run_pass("fold-repeat-kv", capture(GroupedAttention(4, 2), _inputs(2, 4)))
    assert not uneven.modified and "4 times but value heads 2 times" in uneven.rejections[0].reason
    shared = run_pass("fold-repeat-kv", capture(GroupedAttention(also_return_keys=True), _inputs()))
    assert not shared.modified and "also read elsewhere" in shared.rejections[0].reason


def test_exports_as_one_attention_reading_the_shared_heads_with_parity():
    model, inputs = GroupedAttention().eval(), _inputs()
    gm = run_pass("fold-repeat-kv", capture(model, inputs)).graph_module
    proto, _ = export_model_proto(gm, inputs, opset=23)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Attention"] == 1 and not ops["Expand"]
    feeds = {i.name: t.numpy() for i, t in zip(proto.graph.input, inputs)}
    got = create_session(proto, "cpu").session.run(None, feeds)[0]
    np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)
