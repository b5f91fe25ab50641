"""PassManager: ordering, fixed point, nesting, error context, rollback, contract checks."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from fxcompress.capture import capture
from fxcompress.errors import PassError
from fxcompress.infra import Instrument, Pass, PassManager, PassResult, RecordDiff, Timing, VerifyNumerics
from fxcompress.infra.pass_base import PassContractError
from tests.models import ConvBnRelu, WithNoOps

aten = torch.ops.aten


class Log(Pass):
    """Appends its label to a shared list; never changes the graph."""

    name = "log"

    def __init__(self, label: str, log: list[str]) -> None:
        self.label, self.log = label, log
        super().__init__()

    @property
    def display_name(self) -> str:
        return self.label

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.log.append(self.label)
        return PassResult(gm, False)


class CountDown(Pass):
    """Reports a change while its counter is positive (to exercise fixed-point iteration)."""

    name = "count-down"

    def __init__(self, times: int) -> None:
        super().__init__()
        self.remaining = times

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.remaining <= 0:
            return PassResult(gm, False)
        self.remaining -= 1
        return PassResult(gm, True)


class Explode(Pass):
    name = "explode"

    def call(self, gm: fx.GraphModule) -> PassResult:
        # Damage the graph first, then fail: the manager must hand back the undamaged one.
        for node in gm.graph.nodes:
            if node.op == "call_function":
                node.target = aten.sigmoid.default
                node.args = node.args[:1]
                node.kwargs = {}
                break
        raise RuntimeError("boom")


class BreakNumerics(Pass):
    """A deliberately broken 'lossless' pass: turns the first linear's output negative."""

    name = "break-numerics"

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in gm.graph.nodes:
            if node.target is aten.linear.default:
                with gm.graph.inserting_after(node):
                    neg = gm.graph.call_function(aten.neg.default, (node,))
                node.replace_all_uses_with(neg)
                neg.args = (node,)
                neg.meta["val"] = node.meta.get("val")
                return PassResult(gm, True)
        return PassResult(gm, False)


class ReturnsWrongType(Pass):
    name = "wrong-type"

    def call(self, gm):  # type: ignore[override]
        return gm


def _captured():
    model = ConvBnRelu().eval()
    x = torch.randn(1, 3, 16, 16)
    return model, x, capture(model, (x,))


def test_passes_run_in_order():
    log: list[str] = []
    _, _, gm = _captured()
    PassManager([Log("a", log), Log("b", log), Log("c", log)])(gm)
    assert log == ["a", "b", "c"]


def test_fixed_point_repeats_until_no_change():
    _, _, gm = _captured()
    counter = CountDown(3)
    manager = PassManager([counter], max_iterations=10)
    result = manager(gm)
    assert result.modified
    assert counter.remaining == 0
    # 3 changing runs + 1 run that reports no change
    assert [r.modified for r in manager.records] == [True, True, True, False]
    assert manager.converged


def test_fixed_point_stops_at_max_iterations_and_says_not_converged():
    _, _, gm = _captured()
    manager = PassManager([CountDown(10)], max_iterations=3)
    manager(gm)
    assert len(manager.records) == 3
    assert not manager.converged


def test_single_iteration_runs_each_pass_once():
    _, _, gm = _captured()
    manager = PassManager([CountDown(5)])
    manager(gm)
    assert len(manager.records) == 1


def test_managers_nest_and_records_carry_the_path():
    log: list[str] = []
    _, _, gm = _captured()
    inner = PassManager([Log("b", log), Log("c", log)], name="inner")
    outer = PassManager([Log("a", log), inner, Log("d", log)], name="outer", instruments=[Timing()])
    outer(gm)
    assert log == ["a", "b", "c", "d"]
    assert [r.name for r in outer.records] == ["a", "inner/b", "inner/c", "d"]
    assert all(r.seconds is not None for r in outer.records)  # parent instruments ran on nested passes


def test_failure_names_the_pass_and_those_before_it_and_keeps_the_graph():
    log: list[str] = []
    _, x, gm = _captured()
    expected = gm(x)
    manager = PassManager([Log("a", log), Log("b", log), Explode()])
    with pytest.raises(PassError) as info:
        manager(gm)
    err = info.value
    assert err.pass_name == "explode"
    assert err.ran_before == ["a", "b"]
    assert "Pass 'explode' failed after ['a', 'b']" in str(err)
    assert "boom" in str(err)
    torch.testing.assert_close(err.last_good(x), expected)


def test_numerics_instrument_rolls_back_a_drifting_lossless_pass():
    model, x, gm = _captured()
    reference = model(x)
    manager = PassManager([BreakNumerics()], instruments=[VerifyNumerics((x,), reference)])
    result = manager(gm)
    record = manager.records[0]
    assert record.rolled_back is not None and "drifted" in record.rolled_back
    assert not record.modified and not result.modified
    assert not any(n.target is aten.neg.default for n in result.graph_module.graph.nodes)
    torch.testing.assert_close(result.graph_module(x), reference)


def test_lossy_pass_drift_is_recorded_not_rolled_back():
    class LossyBreak(BreakNumerics):
        name = "lossy-break"
        lossless = False

    model, x, gm = _captured()
    reference = model(x)
    manager = PassManager([LossyBreak()], instruments=[VerifyNumerics((x,), reference)])
    manager(gm)
    assert manager.records[0].rolled_back is None
    assert manager.records[0].drift > 0.5


def test_pass_returning_wrong_type_is_a_contract_error():
    _, _, gm = _captured()
    with pytest.raises(PassContractError, match="returned GraphModule"):
        ReturnsWrongType()(gm)


def test_instrument_hooks_are_called_in_order_and_can_skip_passes():
    events: list[str] = []

    class Spy(Instrument):
        def before_pipeline(self, gm):
            events.append("before_pipeline")

        def should_run(self, p, gm):
            return p.display_name != "skipme"

        def before_pass(self, p, gm, record):
            events.append(f"before:{record.name}")

        def after_pass(self, p, gm, result, record):
            events.append(f"after:{record.name}")

        def after_pipeline(self, gm, records):
            events.append("after_pipeline")

    log: list[str] = []
    _, _, gm = _captured()
    PassManager([Log("a", log), Log("skipme", log)], instruments=[Spy()])(gm)
    assert events == ["before_pipeline", "before:a", "after:a", "after_pipeline"]
    assert log == ["a"]


def test_record_diff_keeps_snapshots_and_counts():
    from fxcompress.passes.cleanup import RemoveNoOpsPass

    model = WithNoOps().eval()
    x = torch.randn(2, 16)
    gm = capture(model, (x,))
    recorder = RecordDiff()
    manager = PassManager([RemoveNoOpsPass()], instruments=[recorder])
    manager(gm)
    record = manager.records[0]
    assert record.modified
    assert record.nodes_after < record.nodes_before
    diff = recorder.diff("captured", "remove-no-ops")
    removed_ops = {n.operation for n in diff.removed}
    assert "aten.dropout" in removed_ops
    assert diff.op_delta.get("aten.dropout") == -1
