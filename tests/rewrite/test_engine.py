"""The rewrite engine itself (fxcompress.rewrite): matching, check's verdicts, what the engine does
around ``rewrite`` (uses, provenance, erasure), and a clear error for each way a rule can be wrong.

Graphs are traced from functions calling ATen ops directly: the engine needs no shapes, and these
build in milliseconds.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import fx

from fxcompress.graph_meta import PROVENANCE_KEY
from fxcompress.infra.manager import PassManager
from fxcompress.infra.pass_base import PassContractError, Rejection
from fxcompress.rewrite import NOTHING, Match, Reject, RewriteContext, RewritePass, Rule

aten = torch.ops.aten


def scaled_twice(x):
    return aten.mul.Tensor(aten.mul.Tensor(x, 2.0), 3.0)


def scaled_twice_and_kept(x):
    inner = aten.mul.Tensor(x, 2.0)
    return aten.mul.Tensor(inner, 3.0), inner  # the inner product is an output too


def graph(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def muls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]


def factor(node) -> float | None:
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.mul.Tensor:
        return node.args[1] if isinstance(node.args[1], float) else None
    return None


class FoldMuls(Rule):
    """(x * a) * b  =>  x * (a*b); the check and rewrite are swappable per test."""

    name = "fold-muls"
    stat = "folded"
    seen_contexts: list

    def __init__(self, verdict=None, result="node"):
        self.verdict, self.result, self.seen_contexts = verdict, result, []

    def pattern(self, ctx, node):
        self.seen_contexts.append(ctx)
        if factor(node) is not None and factor(node.args[0]) is not None:
            return Match(node, node.args[0], total=factor(node) * factor(node.args[0]))
        return None

    def check(self, ctx, match):
        if self.verdict == "inner-users":
            outer, inner = match.nodes
            others = [u.name for u in inner.users if u is not outer]
            return Reject(f"'{inner.name}' is also read by {others}") if others else None
        return self.verdict

    def rewrite(self, ctx, match):
        if self.result == "node":
            return ctx.call(aten.mul.Tensor, (match.nodes[1].args[0], match.total))
        return self.result


def make_pass(rule: Rule) -> RewritePass:
    class _Pass(RewritePass):
        name = "test-fold-muls"

        def rules(self):
            return [rule]

    return _Pass()


# --- matching and accepting -------------------------------------------------------------------------

def test_pattern_gets_the_context_and_an_accepted_match_is_rewritten():
    gm = graph(scaled_twice)
    rule = FoldMuls()
    result = make_pass(rule)(gm)
    assert result.modified and result.stats["folded"] == 1
    assert rule.seen_contexts and all(isinstance(c, RewriteContext) for c in rule.seen_contexts)
    (mul,) = muls(gm)
    assert mul.args[1] == 6.0 and mul.args[0].op == "placeholder"
    x = torch.randn(4)
    torch.testing.assert_close(gm(x), x * 6.0)


def test_the_engine_erases_the_match_so_a_second_run_changes_nothing():
    gm = graph(scaled_twice)
    first = make_pass(FoldMuls())(gm)
    assert first.stats["nodes_removed"] == 1  # two multiplications became one; nothing else is left over
    code = gm.code
    again = make_pass(FoldMuls())(gm)
    assert not again.modified and again.stats["folded"] == 0 and gm.code == code


def test_provenance_is_stamped_on_what_the_rewrite_created_naming_the_replaced_nodes_in_graph_order():
    gm = graph(scaled_twice)
    inner, outer = (n.name for n in muls(gm))
    make_pass(FoldMuls())(gm)
    (mul,) = muls(gm)
    assert mul.meta[PROVENANCE_KEY] == {"pass": "test-fold-muls", "from": [inner, outer]}


def test_a_stamp_the_rule_set_itself_is_kept():
    class OwnStamp(FoldMuls):
        def rewrite(self, ctx, match):
            node = ctx.call(aten.mul.Tensor, (match.nodes[1].args[0], match.total))
            ctx.stamp(node, [match.root])
            return node

    gm = graph(scaled_twice)
    outer = muls(gm)[1].name
    make_pass(OwnStamp())(gm)
    assert muls(gm)[0].meta[PROVENANCE_KEY]["from"] == [outer]


def test_a_matched_node_rewritten_in_place_is_kept_and_stamped():
    class Absorb(FoldMuls):  # the inner multiplication takes the product; the outer one goes
        def rewrite(self, ctx, match):
            inner = match.nodes[1]
            inner.args = (inner.args[0], match.total)
            return inner

    gm = graph(scaled_twice)
    inner, outer = muls(gm)
    make_pass(Absorb())(gm)
    assert muls(gm) == [inner] and inner.args[1] == 6.0
    assert inner.meta[PROVENANCE_KEY]["from"] == [inner.name, outer.name]


def test_a_dict_replaces_several_matched_nodes():
    class Both(FoldMuls):
        def rewrite(self, ctx, match):
            outer, inner = match.nodes
            x = inner.args[0]
            return {outer: ctx.call(aten.mul.Tensor, (x, match.total)),
                    inner: ctx.call(aten.mul.Tensor, (x, inner.args[1]), like=inner, before=inner)}

    gm = graph(scaled_twice_and_kept)
    result = make_pass(Both(verdict=None))(gm)
    assert result.stats["folded"] == 1
    x = torch.randn(3)
    out, kept = gm(x)
    torch.testing.assert_close(out, x * 6.0)
    torch.testing.assert_close(kept, x * 2.0)


def test_nothing_erases_a_root_without_users():
    def unused(x):
        aten.mul.Tensor(aten.mul.Tensor(x, 2.0), 3.0)
        return x

    class Drop(FoldMuls):
        def rewrite(self, ctx, match):
            return NOTHING

    gm = graph(unused)
    result = make_pass(Drop())(gm)
    assert result.modified and muls(gm) == []


# --- check: rejections are near-misses --------------------------------------------------------------

@pytest.mark.parametrize("verdict", [Reject("the product is read elsewhere"), "the product is read elsewhere"])
def test_check_declines_with_a_reason_reported_as_a_rejection(verdict):
    gm = graph(scaled_twice)
    code = gm.code
    result = make_pass(FoldMuls(verdict=verdict))(gm)
    assert not result.modified and gm.code == code
    outer = muls(gm)[1].name
    assert result.rejections == [Rejection("fold-muls", outer, "the product is read elsewhere")]


def test_near_misses_reach_the_pass_manager_records():
    gm = graph(scaled_twice_and_kept)
    manager = PassManager([make_pass(FoldMuls(verdict="inner-users"))])
    manager(gm)
    (record,) = manager.records
    assert [(r.rule, r.reason) for r in record.rejections] == [("fold-muls", "'mul_tensor' is also read by ['output']")]
    assert not record.modified


# --- misuse: each is an error that says what to do ----------------------------------------------------

@pytest.mark.parametrize("verdict", [True, False, 1, ""])
def test_check_returning_anything_but_none_or_a_reason_is_a_contract_error(verdict):
    with pytest.raises(PassContractError, match=r"check returns None to accept .*Reject\('why not'\)") as info:
        make_pass(FoldMuls(verdict=verdict))(graph(scaled_twice))
    assert "fold-muls" in str(info.value) and repr(verdict) in str(info.value)


def test_check_returning_true_says_why_it_is_not_accepted():
    with pytest.raises(PassContractError, match="onnxscript's rewriter accepts with `return True`"):
        make_pass(FoldMuls(verdict=True))(graph(scaled_twice))


def test_rewrite_returning_nothing_is_a_contract_error():
    with pytest.raises(PassContractError, match="must return the replacement .*replaced and erased nodes by hand"):
        make_pass(FoldMuls(result=None))(graph(scaled_twice))


@pytest.mark.parametrize("wrong", [6.0, "mul", [None]])
def test_rewrite_returning_a_wrong_type_is_a_contract_error(wrong):
    with pytest.raises(PassContractError, match=f"must return the replacement .*it returned {type(wrong).__name__}"):
        make_pass(FoldMuls(result=wrong))(graph(scaled_twice))


def test_nothing_for_a_root_that_is_still_read_is_a_contract_error():
    with pytest.raises(PassContractError, match="returned NOTHING .* still read by"):
        make_pass(FoldMuls(result=NOTHING))(graph(scaled_twice))


def test_accepting_a_match_whose_inner_node_is_read_outside_it_is_a_contract_error():
    gm = graph(scaled_twice_and_kept)
    with pytest.raises(PassContractError, match=r"inner node 'mul_tensor' is also read by 'output', outside the match"):
        make_pass(FoldMuls(verdict=None))(gm)
    assert len(muls(gm)) == 2  # refused before the rewrite ran: nothing changed


def test_a_first_engine_rule_is_refused_with_the_new_signature():
    class OldStyle(Rule):
        name, stat = "old", "old"

        def pattern(self, node):
            return None

    with pytest.raises(PassContractError, match=re.escape("pattern(self, ctx, node)")):
        make_pass(OldStyle())(graph(scaled_twice))


def test_a_pattern_returning_something_else_than_a_match_is_a_contract_error():
    class Tuple(FoldMuls):
        def pattern(self, ctx, node):
            return (node,) if factor(node) is not None else None

    with pytest.raises(PassContractError, match="pattern returned tuple .* return None or a Match"):
        make_pass(Tuple())(graph(scaled_twice))


def test_rules_that_keep_rewriting_are_stopped():
    class Forever(Rule):  # x * 2.0 => a new x * 2.0, matched again on every walk
        name, stat = "forever", "rewrites"

        def pattern(self, ctx, node):
            return Match(node) if factor(node) == 2.0 else None

        def rewrite(self, ctx, match):
            return ctx.call(aten.mul.Tensor, match.root.args)

    with pytest.raises(PassContractError, match="still rewrote the graph after 50 walks"):
        make_pass(Forever())(graph(scaled_twice))
