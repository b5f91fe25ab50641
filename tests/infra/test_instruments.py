"""Instruments: crash dumps, change printing, numerics guarding output signatures."""

from __future__ import annotations

import io

import pytest
import torch

from fxcompress.capture import capture
from fxcompress.errors import PassError
from fxcompress.infra import DumpIR, Pass, PassManager, PassResult, PrintAfterChange, RecordDiff, VerifyNumerics
from fxcompress.passes.cleanup import RemoveNoOpsPass
from tests.models import TupleOutput, WithNoOps


class Crash(Pass):
    name = "crash"

    def call(self, gm):
        raise RuntimeError("kaput")


class SwapOutputs(Pass):
    name = "swap-outputs"

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first, second = out.args[0]
        out.args = ((second, first),)
        return PassResult(gm, True)


def test_dump_ir_writes_crash_dump_of_failing_pass_input(tmp_path):
    gm = capture(WithNoOps(), (torch.randn(2, 16),))
    manager = PassManager([RemoveNoOpsPass(), Crash()], instruments=[DumpIR(tmp_path)])
    with pytest.raises(PassError):
        manager(gm)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_captured.txt", "001_remove-no-ops.txt", "002_crash.crash.txt"]
    crash = (tmp_path / "002_crash.crash.txt").read_text()
    assert "aten.linear" in crash and "dropout" not in crash  # the input the crashing pass saw


def test_print_after_change_only_prints_changes():
    stream = io.StringIO()
    gm = capture(WithNoOps(), (torch.randn(2, 16),))
    PassManager([RemoveNoOpsPass(), RemoveNoOpsPass()], instruments=[PrintAfterChange(stream)])(gm)
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[remove-no-ops] ") and "-1 aten.dropout" in lines[0]


def test_numerics_rolls_back_a_pass_that_changes_the_output_signature():
    model = TupleOutput().eval()
    x = torch.randn(2, 6)
    gm = capture(model, (x,))
    manager = PassManager([SwapOutputs()], instruments=[VerifyNumerics((x,), model(x))])
    result = manager(gm)
    assert "outputs changed" in manager.records[0].rolled_back
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_record_diff_drops_the_snapshot_of_a_rolled_back_pass():
    model = TupleOutput().eval()
    x = torch.randn(2, 6)
    gm = capture(model, (x,))
    recorder = RecordDiff()
    # RecordDiff runs first, so it has snapshotted the swap by the time VerifyNumerics rolls it back.
    manager = PassManager([SwapOutputs()], instruments=[recorder, VerifyNumerics((x,), model(x))])
    manager(gm)
    assert manager.records[0].rolled_back
    assert [s.label for s in recorder.snapshots] == ["captured"]
    assert "diff" not in manager.records[0].extra
