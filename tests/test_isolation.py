"""Rollback and isolation: a pass that raises or breaks numerics leaves the previous graph intact
and is named; no public call changes the user's model (parameters, buffers, training flags —
hashed before and after), their input tensors, or files it only reads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.cli import main
from fxcompress.errors import DriftError, PassError
from fxcompress.infra import Pass, PassResult
from fxcompress.numerics import LOSSLESS_TOLERANCE
from tests.fuzz.checks import model_digest
from tests.models import ConvBnRelu, randomize_bn


def _model(train: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(ConvBnRelu())
    return model.train() if train else model.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _first_call(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))


class ZeroWeightsThenRaise(Pass):
    """Damages the graph and its weights in place, then raises: the worst kind of failing pass."""

    name = "test-zero-then-raise"

    def call(self, gm):
        for p in gm.parameters():
            p.data.zero_()
        node = _first_call(gm)
        node.replace_all_uses_with(node.args[0])
        raise RuntimeError("boom in the middle of a rewrite")


class ScaleWeights(Pass):
    """A pass that claims to be lossless but changes the numbers (scales every weight in place)."""

    name = "test-scale-weights"

    def call(self, gm):
        for p in gm.parameters():
            p.data.mul_(1.5)
        return PassResult(gm, True, {"scaled": 1})


class LossyScaleWeights(ScaleWeights):
    name = "test-lossy-scale"
    lossless = False


class BreakExecution(Pass):
    """Leaves a graph that lints but no longer runs (a weight of the wrong shape)."""

    name = "test-break-execution"

    def call(self, gm):
        conv = _first_call(gm)
        weight = conv.args[1]
        setattr(gm, weight.target.replace(".", "_") + "_bad", nn.Parameter(torch.zeros(1, 1, 1, 1)))
        with gm.graph.inserting_before(conv):
            bad = gm.graph.get_attr(weight.target.replace(".", "_") + "_bad")
        conv.replace_input_with(weight, bad)
        return PassResult(gm, True)


class ChangeOutputShape(Pass):
    """Changes the graph's output signature (sums the logits away: [2, 10] -> [2])."""

    name = "test-change-output-shape"

    def call(self, gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        logits = output.args[0][0]
        with gm.graph.inserting_before(output):
            summed = gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (logits, [-1]))
        output.args = ((summed,),)
        return PassResult(gm, True)


def _outputs(module, x=X):
    with torch.no_grad():
        return module(x.clone())


def test_raising_pass_is_named_and_the_previous_graph_is_kept():
    model = _model()
    digest = model_digest(model)
    with pytest.raises(PassError) as info:
        fxcompress.compile(model, (X,), ["remove-no-ops", ZeroWeightsThenRaise()])
    error = info.value
    assert "Pass 'test-zero-then-raise' failed after ['remove-no-ops']" in str(error)
    assert "boom in the middle of a rewrite" in str(error) and "Fix:" in str(error)
    # The graph from before the failing pass: weights intact, the rewired node still there.
    torch.testing.assert_close(_outputs(error.last_good), _outputs(model), atol=1e-5, rtol=1e-5)
    assert model_digest(model) == digest


@pytest.mark.parametrize("bad_pass, reason", [
    (ScaleWeights(), "lossless pass drifted"),
    (BreakExecution(), "graph no longer runs"),
    (ChangeOutputShape(), "outputs changed"),
])
def test_pass_that_breaks_the_graph_is_rolled_back_and_named(bad_pass, reason):
    model = _model()
    digest = model_digest(model)
    result = fxcompress.compile(model, (X,), ["remove-no-ops", bad_pass, "eliminate-dead-code"])
    rolled = result.report.rolled_back
    assert [r.name for r in rolled] == [bad_pass.name] and reason in rolled[0].rolled_back
    assert f"ROLLED BACK: {rolled[0].rolled_back}" in result.report.table()
    # The rolled-back pass's in-place weight changes did not leak into the result, and the
    # passes after it still ran.
    torch.testing.assert_close(_outputs(result.module), _outputs(model), atol=1e-5, rtol=1e-5)
    assert result.report.records[-1].name == "eliminate-dead-code"
    assert model_digest(model) == digest


def test_lossy_pass_beyond_tolerance_raises_drift_error_naming_it():
    model = _model()
    digest = model_digest(model)
    with pytest.raises(DriftError, match="measured after pass 'test-lossy-scale'"):
        fxcompress.compile(model, (X,), [LossyScaleWeights()], tolerance=1e-3)
    assert model_digest(model) == digest


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A train-mode user model, its compiled result and the exported file."""
    model = _model(train=True)
    result = fxcompress.compile(model, (X,))
    path = result.export_onnx(tmp_path_factory.mktemp("iso") / "m.onnx")
    return model, result, path


def test_every_public_call_leaves_model_inputs_and_files_unchanged(exported, tmp_path):
    model, result, path = exported
    x = X.clone()
    digest, file_digest = model_digest(model), _file_digest(path)
    calls = {
        "compile default": lambda: fxcompress.compile(model, (x,)),
        "compile int8": lambda: fxcompress.compile(model, (x,), "int8", [(X + 0.1,), (X - 0.1,)], tolerance=1.0),
        "export_onnx": lambda: result.export_onnx(tmp_path / "again.onnx"),
        "validate": lambda: fxcompress.validate(path, model, (x,)),
        "benchmark": lambda: fxcompress.benchmark(path, (x,), warmup=0, runs=2),
    }
    for label, call in calls.items():
        if label == "compile int8" and "int8" not in fxcompress.passes.presets.PRESETS:
            continue
        call()
        assert model_digest(model) == digest, f"{label} changed the user's model"
        assert model.training, f"{label} switched the user's model to eval mode"
        assert torch.equal(x, X), f"{label} changed the input tensor"
        assert _file_digest(path) == file_digest, f"{label} changed the ONNX file it read"


def test_export_keeps_the_compiled_modules_mode_and_weights(exported, tmp_path):
    _, result, _ = exported
    module = result.module.train()  # users fine-tune result.module and export between epochs
    digest = model_digest(module)
    result.export_onnx(tmp_path / "m.onnx")
    assert model_digest(module) == digest and module.training


#: The CLI test loads its model through a factory; the factory hands out this one object, so its
#: hash shows whether `fxcompress compile` changed what the factory returned.
SHARED = _model()


def shared_model():
    return SHARED, (X,)


def test_cli_compile_leaves_the_loaded_model_unchanged(tmp_path, capsys):
    digest = model_digest(SHARED)
    out = tmp_path / "cli.onnx"
    assert main(["compile", "tests.test_isolation:shared_model", "--out", str(out), "--no-baseline", "--runs", "8"]) == 0
    assert out.is_file()
    assert model_digest(SHARED) == digest
    assert "Wrote" in capsys.readouterr().out


class WritesIntoItsInput(nn.Module):
    """forward() scales its input in place (as some preprocessing layers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2)
        return self.fc(x)


def test_model_that_mutates_its_input_compiles_and_validates():
    # Before the fix the eager reference, capture and numerics runs each doubled the same tensor:
    # compile failed with a DriftError blaming an innocent pass.
    model = WritesIntoItsInput().eval()
    x = torch.ones(2, 4)
    result = fxcompress.compile(model, (x.clone(),))
    assert result.report.drift <= LOSSLESS_TOLERANCE
    torch.testing.assert_close(result.module(torch.ones(2, 4)), model(torch.ones(2, 4)))
    path = result.export_onnx(Path(__import__("tempfile").mkdtemp()) / "m.onnx")
    assert fxcompress.validate(path, model, (x,)).passed
    assert torch.equal(x, torch.ones(2, 4)), "validate changed the input tensor"


def test_compile_does_not_change_an_input_the_model_mutates():
    x = torch.ones(2, 4)
    fxcompress.compile(WritesIntoItsInput().eval(), (x,))
    assert torch.equal(x, torch.ones(2, 4))
