"""Cleanup passes: structure, idempotence, numerics and the cases they must leave alone."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from fxcompress.passes.cleanup import EliminateDeadCodePass, RemoveNoOpsPass
from tests.models import Residual, WithNoOps, randomize_bn

aten = torch.ops.aten


def _ops(gm) -> Counter:
    return op_histogram(gm)


def test_remove_no_ops_structure_numerics_and_idempotence():
    model = WithNoOps().eval()
    x = torch.randn(3, 16)
    gm = capture(model, (x,))
    before = _ops(gm)
    assert before["aten.dropout"] == 1
    result = RemoveNoOpsPass()(gm)
    assert result.modified
    after = _ops(result.graph_module)
    assert after["aten.dropout"] == 0
    assert after["aten.reshape"] == 0 and after["aten.to"] == 0 and after["aten.contiguous"] == 0
    assert after["aten.linear"] == 1
    result.graph_module.recompile()
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=0, atol=0)
    assert not RemoveNoOpsPass()(result.graph_module).modified


def test_dropout_in_training_mode_is_kept():
    class TrainDropout(nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.5, training=True)

    gm = capture(TrainDropout(), (torch.randn(4, 4),))
    result = RemoveNoOpsPass()(gm)
    assert not result.modified
    assert _ops(result.graph_module)["aten.dropout"] == 1


def test_reshape_that_changes_shape_is_kept():
    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(2, 8) * 2

    gm = capture(Flat(), (torch.randn(4, 4),))
    assert not RemoveNoOpsPass()(gm).modified


def test_copy_that_is_mutated_later_is_kept():
    class CloneThenMutate(nn.Module):
        def forward(self, x):
            y = x.clone()
            y.add_(1.0)
            return x + y

    model = CloneThenMutate()
    x = torch.randn(4)
    gm = capture(model, (x,))
    result = RemoveNoOpsPass()(gm)
    assert _ops(result.graph_module)["aten.clone"] == 1
    result.graph_module.recompile()
    torch.testing.assert_close(result.graph_module(x.clone()), model(x.clone()))


def test_dead_code_elimination_drops_unused_nodes_and_state():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            _ = torch.sin(x)  # dead
            return self.used(x)

    model = Dead()
    x = torch.randn(2, 4)
    gm = capture(model, (x,))
    result = EliminateDeadCodePass()(gm)
    assert result.modified
    out = result.graph_module
    assert _ops(out)["aten.sin"] == 0
    names = set(dict(out.named_parameters()))
    assert not any(n.startswith("unused") for n in names)
    out.recompile()
    torch.testing.assert_close(out(x), model(x))
    assert not EliminateDeadCodePass()(out).modified


def test_dead_code_elimination_keeps_in_place_side_effects():
    model = randomize_bn(Residual()).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = capture(model, (x,))
    inplace_before = _ops(gm)["aten.relu_"] + _ops(gm)["aten.add_"]
    result = EliminateDeadCodePass()(gm)
    assert _ops(result.graph_module)["aten.relu_"] + _ops(result.graph_module)["aten.add_"] == inplace_before
    result.graph_module.recompile()
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_dead_in_place_op_on_live_tensor_is_kept():
    class MutatesUnusedResult(nn.Module):
        def forward(self, x):
            y = x * 2
            y.relu_()  # result unused, but it mutates y, which is returned
            return y

    model = MutatesUnusedResult()
    x = torch.randn(8)
    gm = capture(model, (x,))
    result = EliminateDeadCodePass()(gm)
    result.graph_module.recompile()
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_option_keeps_unused_state():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x)

    gm = capture(Unused(), (torch.randn(1, 2),))
    EliminateDeadCodePass(drop_unused_state=False)(gm)
    assert "b.weight" in dict(gm.named_parameters())


def test_dead_code_elimination_drops_unused_deterministic_attention_but_keeps_random_draws():
    """torch tags SDPA and dropout as random whatever their arguments; called deterministically they are pure."""

    class UnusedBranches(nn.Module):
        def forward(self, q, k, v):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)  # dropout_p=0: pure, unused
            torch.ops.aten.dropout(q, 0.5, True)  # draws random numbers: the RNG state moves
            return q * 2

    gm = capture(UnusedBranches(), tuple(torch.randn(1, 2, 5, 4) for _ in range(3)))
    assert _ops(gm)["aten.scaled_dot_product_attention"] == 1 and _ops(gm)["aten.dropout"] == 1
    result = EliminateDeadCodePass()(gm)
    assert result.modified
    after = _ops(result.graph_module)
    assert after["aten.scaled_dot_product_attention"] == 0 and after["aten.dropout"] == 1
    assert not EliminateDeadCodePass()(result.graph_module).modified
