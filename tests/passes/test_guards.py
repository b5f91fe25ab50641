"""remove-guards: structure, modified + idempotence, numerics, and negative cases."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from fxcompress.infra.registry import create_pass
from tests.passes.helpers import assert_matches, provenance_of, run_pass

aten = torch.ops.aten


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x.to(torch.float32)).relu()


class ConstantCond(nn.Module):
    """torch.cond whose predicate reads only a buffer: known once the model is captured."""

    def __init__(self, flag: float) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("flag", torch.tensor([flag]))

    def forward(self, x):
        y = torch.cond(self.flag.sum() > 0, lambda a: a.sin(), lambda a: a.cos(), (x,))
        return self.fc(y)


class InputCond(nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda a: a.sin(), lambda a: a.cos(), (x,))


def test_remove_guards_drops_guard_module_and_true_asserts():
    model, x = Plain().eval(), torch.randn(2, 6)
    gm = capture(model, (x,))
    assert ops(gm)["call_module:_guards_fn"] == 1 and ops(gm)["aten._assert_tensor_metadata"] == 1
    result = run_pass("remove-guards", gm)
    assert result.modified
    assert result.stats["guards_removed"] == 1 and result.stats["asserts_removed"] == 1
    after = ops(result.graph_module)
    assert after["call_module:_guards_fn"] == 0 and after["aten._assert_tensor_metadata"] == 0
    assert not hasattr(result.graph_module, "_guards_fn")
    assert_matches(model, result.graph_module, x)


def test_remove_guards_can_keep_input_guards():
    gm = capture(Plain().eval(), (torch.randn(2, 6),))
    result = run_pass("remove-guards", gm, keep_input_guards=True)
    assert ops(result.graph_module)["call_module:_guards_fn"] == 1


def test_remove_guards_resolves_scalars_and_scalar_asserts():
    gm = capture(Plain().eval(), (torch.randn(2, 6),))
    graph = gm.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    relu = next(n for n in graph.nodes if n.target is aten.relu.default)
    with graph.inserting_before(relu):
        size = graph.call_function(aten.sym_size.int, (x, 0))
        size.meta["val"] = 2  # capture resolved this size to a plain int
        holds = graph.call_function(aten._assert_scalar.default, (True, "always holds"))
        fails = graph.call_function(aten._assert_scalar.default, (False, "always fails"))
        ranged = graph.call_function(aten.sym_constrain_range.default, (size,), {"min": 1, "max": 4})
    gm.recompile()
    result = create_pass("remove-guards")(gm)
    assert result.stats["scalars_resolved"] == 1 and result.stats["asserts_removed"] == 3  # + the dtype check
    remaining = [n for n in result.graph_module.graph.nodes if n.op == "call_function"]
    assert fails in remaining and holds not in remaining and size not in remaining and ranged not in remaining
    assert any("statically false" in r.reason for r in result.rejections)


def test_remove_guards_inlines_constant_conditional():
    for flag, kept, dropped in ((1.0, "aten.sin", "aten.cos"), (-1.0, "aten.cos", "aten.sin")):
        model, x = ConstantCond(flag).eval(), torch.randn(3, 6)
        gm = capture(model, (x,))
        assert ops(gm)["cond"] == 1
        result = run_pass("remove-guards", gm)
        assert result.stats["conditionals_resolved"] == 1
        after = ops(result.graph_module)
        assert after["cond"] == 0 and after[kept] == 1 and after[dropped] == 0
        assert after["aten.sum"] == 0 and after["aten.gt"] == 0  # the predicate leaves no residue
        assert not any(name.endswith("_graph_0") for name, _ in result.graph_module.named_children())
        assert provenance_of(result.graph_module, "remove-guards")
        assert_matches(model, result.graph_module, x)


def test_remove_guards_keeps_input_dependent_conditional():
    gm = capture(InputCond(), (torch.randn(3, 6),))
    result = run_pass("remove-guards", gm)
    assert ops(result.graph_module)["cond"] == 1
    assert any("depends on the inputs" in r.reason for r in result.rejections)
