"""Channel dependency analysis: which channels are coupled, and which groups are refused and why."""

from __future__ import annotations

import torch
from torch import nn

import fxcompress
from fxcompress.analysis.channel_graph import Segment, build_channel_graph, keep_indices, pruned_length
from fxcompress.analysis.macs import count_macs, macs_by_layer
from fxcompress.capture import capture


def _graph(model: nn.Module, *inputs: torch.Tensor):
    gm = capture(model.eval(), inputs)
    return gm, build_channel_graph(gm)


def _group_of(cg, layer: str):
    return next(g for g in cg.groups() if layer in g.layers)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        y = self.b(torch.relu(self.a(s))) + s
        return self.fc(y.mean((2, 3)))


def test_residual_add_couples_both_branches_and_their_norms():
    gm, cg = _graph(_Residual(), torch.randn(1, 3, 8, 8))
    group = _group_of(cg, "stem")
    assert set(group.layers) == {"stem", "b"} and group.channels == 8 and group.prunable
    targets = {(pd.target, pd.dim) for pd in cg.param_dims if any(s.space in group.spaces for s in pd.layout)}
    assert {("stem.weight", 0), ("stem.bias", 0), ("bn.weight", 0), ("bn.running_var", 0), ("b.weight", 0),
            ("a.weight", 1), ("fc.weight", 1)} <= targets
    inner = _group_of(cg, "a")
    assert inner.layers == ["a"] and inner.channels == 6 and inner.prunable


def test_output_layer_is_refused_with_reason():
    _, cg = _graph(_Residual(), torch.randn(1, 3, 8, 8))
    fc = _group_of(cg, "fc")
    assert not fc.prunable and "model output" in fc.reasons[0]


class _ConcatFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.cat([self.a(x), self.b(x)], 1), 1))


def test_concat_offsets_and_flatten_blocks_into_linear():
    _, cg = _graph(_ConcatFlatten(), torch.randn(1, 3, 2, 2))
    layout = next(pd.layout for pd in cg.param_dims if pd.target == "fc.weight" and pd.dim == 1)
    space_a, space_b = _group_of(cg, "a").spaces[0], _group_of(cg, "b").spaces[0]
    # channel c of the concat is the block [c*4, c*4+4) of the flattened features
    assert layout == (Segment(space_a, 4, 4), Segment(space_b, 2, 4))
    kept = {space_a: torch.tensor([1, 3]), space_b: torch.tensor([0])}
    assert keep_indices(layout, kept).tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
    assert pruned_length(layout, kept) == 12


class _Depthwise(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.dw(torch.relu(self.pw(x)))))


def test_depthwise_conv_passes_channels_through_and_records_groups_argument():
    _, cg = _graph(_Depthwise(groups=8), torch.randn(1, 3, 6, 6))
    group = _group_of(cg, "pw")
    assert group.prunable
    targets = {(pd.target, pd.dim) for pd in cg.param_dims if any(s.space in group.spaces for s in pd.layout)}
    assert {("dw.weight", 0), ("dw.bias", 0), ("out.weight", 1)} <= targets
    assert [(sa.arg, sa.index) for sa in cg.size_args] == [(6, None)]  # conv2d's groups argument


def test_grouped_conv_is_refused_with_reason():
    _, cg = _graph(_Depthwise(groups=2), torch.randn(1, 3, 6, 6))
    for layer in ("pw", "dw"):
        group = _group_of(cg, layer)
        assert not group.prunable and "grouped convolution" in group.reasons[0]


class _Heads(nn.Module):
    """A linear whose output is reshaped into attention heads, then a feed-forward block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.q = nn.Linear(8, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        q = self.q(h).view(1, 4, 2, 4).transpose(1, 2)  # [B, heads, S, head_dim]
        h = h + (q.transpose(1, 2).reshape(1, 4, 8) @ torch.ones(8, 8))
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h)


def test_attention_heads_are_refused_feed_forward_is_prunable():
    _, cg = _graph(_Heads(), torch.randint(0, 10, (1, 4)))
    q = _group_of(cg, "q")
    assert not q.prunable and "splits the channels" in " ".join(q.reasons)
    assert _group_of(cg, "up").prunable
    # The hidden width meets a computed operand (the matmul with ones) it cannot be sliced with:
    # the embedding is refused there, and so is everything added to that sum afterwards.
    for layer in ("embed", "down"):
        group = _group_of(cg, layer)
        assert not group.prunable and "untracked tensor" in group.reasons[0]


def test_unknown_op_on_channels_refuses_the_group():
    class Cumsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), 1))

    _, cg = _graph(Cumsum(), torch.randn(1, 3, 4, 4))
    group = _group_of(cg, "a")
    assert not group.prunable and "cumsum" in group.reasons[0]


def test_view_that_keeps_channels_is_followed():
    class Squeeze(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(nn.functional.adaptive_avg_pool2d(self.a(x), 1).view(1, 4))

    _, cg = _graph(Squeeze(), torch.randn(1, 3, 4, 4))
    assert _group_of(cg, "a").prunable
    assert [(sa.arg, sa.index) for sa in cg.size_args] == [(1, 1)]  # view's shape[1] follows the channels


def test_macs_match_the_layer_formulas():
    gm, _ = _graph(_ConcatFlatten(), torch.randn(1, 3, 2, 2))
    per_layer = macs_by_layer(gm)
    assert per_layer == {"a": 4 * 4 * 3, "b": 2 * 4 * 3, "fc": 3 * 24}
    assert count_macs(gm) == sum(per_layer.values())


def test_macs_count_addmm_and_dynamic_int8_linear_like_linear():
    class Conv1DStyle(nn.Module):  # GPT-2's Conv1D: addmm(bias, x, weight[in, out])
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 5))
            self.bias = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    gm, _ = _graph(Conv1DStyle(), torch.randn(3, 8))
    assert count_macs(gm) == 3 * 5 * 8
    linear = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.randn(2, 32)
    dense = fxcompress.compile(linear, (x,))
    dynamic = fxcompress.compile(linear, (x,), recipe="int8-dynamic")
    assert count_macs(dynamic.module) == count_macs(dense.module) == 2 * 16 * 32
