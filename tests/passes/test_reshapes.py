"""collapse-reshapes (reshape and permute chains):
structure, applied once + idempotence, numerics, and a negative case per rejection."""

from __future__ import annotations


import torch
from torch import nn

from fxcompress.analysis.graph_stats import op_histogram as ops
from fxcompress.capture import capture
from fxcompress.graph_meta import PROVENANCE_KEY as PROVENANCE
from fxcompress.passes.presets import default
from tests.passes.helpers import drift, outputs_signature, reasons, run_pass

aten = torch.ops.aten


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
