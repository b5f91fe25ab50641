"""The bad-input matrix: every case is refused (or handled) with a clear one-paragraph message,
and nothing is written or mutated — the user's model hashes the same and the output folder stays
empty (temporary files included).

Note on read-only folders: the tests run as root, and chmod does not stop root, so "cannot write
there" is produced with a path under a regular file, with /proc (a pseudo file system that refuses
new files even to root), and with os.access mocked to say no.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.cli import main
from fxcompress.errors import CaptureError, ExportError, InputError, RecipeError
from fxcompress.calibration import Calibration
from fxcompress.infra.context import CompileContext
from fxcompress.passes.presets import PRESETS
from tests.fuzz.checks import model_digest
from tests.models import ConvBnRelu, DataDependent, TwoInputs, randomize_bn

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def model() -> nn.Module:
    return randomize_bn(ConvBnRelu()).eval()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    result = fxcompress.compile(randomize_bn(ConvBnRelu()).eval(), (X,))
    return result.export_onnx(tmp_path_factory.mktemp("bad") / "m.onnx")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refused(exc_type, match: str, call, model: nn.Module | None = None, folder: Path | None = None):
    """``call()`` raises ``exc_type`` matching ``match``; the model and ``folder`` are unchanged."""
    digest = model_digest(model) if model is not None else None
    before = _listing(folder) if folder is not None else None
    with pytest.raises(exc_type, match=match) as info:
        call()
    assert "Fix:" in str(info.value), "every refusal says how to fix it"
    assert "Traceback" not in str(info.value)
    if model is not None:
        assert model_digest(model) == digest, "the model was mutated"
    if folder is not None:
        assert _listing(folder) == before, "something was written"
    return info.value


# --- example inputs: compile, validate, benchmark ------------------------------------------------


@pytest.mark.parametrize("inputs, match", [
    ((X, X), r"fails on the example inputs .* takes 2 positional arguments but 3 were given"),
    ((torch.randn(1, 4, 8, 8),), r"fails on the example inputs \(float32\[1, 4, 8, 8\]\).*expected input\[1, 4, 8, 8\] to have 3 channels"),
    ((X.long(),), r"fails on the example inputs \(int64\[1, 3, 8, 8\]\)"),
    ((X.double(),), r"fails on the example inputs \(float64"),
    (([1, 2],), r"the input at 'x_0' is of type int, not a torch.Tensor"),
    ((), r"example_inputs is empty"),
    ("x", r"must be a tensor or a tuple of tensors, got str"),
])
def test_compile_rejects_inputs_that_do_not_fit(model, inputs, match):
    refused(InputError, match, lambda: fxcompress.compile(model, inputs), model)


def test_compile_points_at_the_users_line_for_a_shape_error(model):
    error = refused(InputError, "fails on the example inputs", lambda: fxcompress.compile(model, (torch.randn(1, 4, 8, 8),)), model)
    assert "tests/models.py" in str(error) and "in forward" in str(error)


@pytest.mark.parametrize("inputs, match", [
    ((X, X), r"takes 2 positional arguments but 3 were given|takes 1 input\(s\)"),
    ((torch.randn(1, 3, 9, 9),), r"Input 0 \('x'\) has shape \[1, 3, 9, 9\] but the model expects \[1, 3, 8, 8\]"),
    ((X.double(),), r"fails on the example inputs \(float64|has dtype float64 but the model expects float32"),
])
def test_validate_rejects_inputs_that_do_not_fit(model, onnx_path, inputs, match):
    refused(InputError, match, lambda: fxcompress.validate(onnx_path, model, inputs), model)


@pytest.mark.parametrize("inputs, match", [
    ((X, X), r"The ONNX model takes 1 input\(s\) \(x\) but 2 were given"),
    ((torch.randn(1, 3, 9, 9),), r"Input 0 \('x'\) has shape \[1, 3, 9, 9\] but the model expects \[1, 3, 8, 8\]"),
    ((X.double(),), r"Input 0 \('x'\) has dtype float64 but the model expects float32"),
])
def test_benchmark_rejects_inputs_that_do_not_fit(onnx_path, inputs, match):
    refused(InputError, match, lambda: fxcompress.benchmark(onnx_path, inputs, warmup=0, runs=1))


def test_benchmark_rejects_zero_iterations(onnx_path):
    refused(InputError, "runs >= 1", lambda: fxcompress.benchmark(onnx_path, (X,), runs=0))


def test_compile_rejects_something_that_is_not_a_module(model):
    refused(InputError, r"model must be a torch.nn.Module, got OrderedDict", lambda: fxcompress.compile(model.state_dict(), (X,)))


def test_uncapturable_model_names_its_line():
    model = DataDependent().eval()
    refused(CaptureError, r"DataDependent.*tests/models.py", lambda: fxcompress.compile(model, (torch.randn(2, 4),)), model)


# --- calibration --------------------------------------------------------------------------------

needs_int8 = pytest.mark.skipif("int8" not in PRESETS, reason="the int8 preset (fxcompress/passes/quantize.py) is not registered yet")


@needs_int8
@pytest.mark.parametrize("calibration, match", [
    ([], r"Pass 'quantize-int8' needs calibration data, but none was given \(or the iterable was empty\)"),
    (None, r"Pass 'quantize-int8' needs calibration data"),
    ([(X,), (torch.full_like(X, float("nan")),)], r"Calibration batch 1 contains NaN or Inf values"),
    ([(X * float("inf"),)], r"Calibration batch 0 contains NaN or Inf values"),
    ([(torch.randn(1, 3, 9, 9),)], r"Calibration batch 0 is \(float32\[1, 3, 9, 9\]\) but the model was captured with \(float32\[1, 3, 8, 8\]\)"),
    ([(X, X)], r"Calibration batch 0 is \(float32\[1, 3, 8, 8\], float32\[1, 3, 8, 8\]\)"),
    (5, r"calibration must be a list, a DataLoader, another iterable or a callable, got int"),
    (torch.randn(4, 3, 8, 8), r"calibration is one tensor of shape \[4, 3, 8, 8\]"),
])
def test_int8_rejects_bad_calibration(model, calibration, match):
    refused(InputError, match, lambda: fxcompress.compile(model, (X,), "int8", calibration), model)


def test_cli_rejects_bad_calibration_spec(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    for spec in ("random:0", "random:abc", "nowhere"):
        assert main(["compile", "tests.models:conv_bn_relu", "--out", str(out), "--calibration", spec, "--no-baseline"]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Fix:" in err and "Traceback" not in err
    assert not out.exists()


# --- unusual but valid models -------------------------------------------------------------------


class NoParameters(nn.Module):
    def forward(self, x):
        return torch.relu(x * 2 + 1).mean(1)


class DictAndTupleOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "extra": (x.sum(1), torch.sigmoid(y))}


@pytest.mark.parametrize("make, x", [(NoParameters, torch.randn(2, 3, 5)), (DictAndTupleOutputs, torch.randn(2, 4))])
def test_models_without_parameters_or_with_nested_outputs_compile_export_and_validate(make, x, tmp_path):
    model = make().eval()
    digest = model_digest(model)
    result = fxcompress.compile(model, (x,))
    expected = model(x)
    got = result.module(x)
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected) and len(got["extra"]) == 2
    path = result.export_onnx(tmp_path / "m.onnx")
    assert fxcompress.validate(path, model, (x,)).passed
    assert model_digest(model) == digest


class UnsupportedOp(nn.Module):
    """kthvalue has no ONNX translation in torch.onnx's dynamo exporter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.kthvalue(self.fc(x), 2, dim=1).values


def test_unsupported_op_is_left_alone_by_passes_and_named_by_export(tmp_path):
    model = UnsupportedOp().eval()
    x = torch.randn(2, 4)
    result = fxcompress.compile(model, (x,))
    assert any("kthvalue" in str(n.target) for n in result.module.graph.nodes)
    torch.testing.assert_close(result.module(x), model(x))
    refused(ExportError, r"cannot translate torch.ops.aten.kthvalue.default \(node 'kthvalue'\)",
            lambda: result.export_onnx(tmp_path / "m.onnx"), model, tmp_path)


# --- recipes ------------------------------------------------------------------------------------

_RECIPES = {
    "unknown pass": ('passes = ["fold-batchnrom"]', r"Unknown pass 'fold-batchnrom'.*did you mean 'fold-batchnorm'"),
    "unknown option": ('passes = ["eliminate-dead-code"]\n[options.eliminate-dead-code]\ndrop_unused = true',
                       r"Pass 'eliminate-dead-code' has no option 'drop_unused'.*drop_unused_state"),
    "wrong type": ('passes = ["eliminate-dead-code"]\n[options.eliminate-dead-code]\ndrop_unused_state = "yes"',
                   r"Option 'drop_unused_state' of pass 'eliminate-dead-code' must be <class 'bool'>, got 'yes'"),
    "syntax error": ('passes = ["remove-no-ops"', r"is not valid TOML"),
    "unknown key": ('passses = ["remove-no-ops"]', r"has unknown keys \['passses'\]"),
    "options for absent pass": ('passes = ["remove-no-ops"]\n[options.eliminate-dead-code]\ndrop_unused_state = false',
                                r"sets options for 'eliminate-dead-code', which the recipe does not run"),
    "unknown base": ('extends = "defualt"', r"Unknown recipe 'defualt'"),
}


@pytest.mark.parametrize("case", list(_RECIPES))
def test_recipe_typos_fail_before_any_work(model, tmp_path, case, capsys):
    text, match = _RECIPES[case]
    recipe = tmp_path / "r.toml"
    recipe.write_text(text + "\n")
    refused(RecipeError, match, lambda: fxcompress.compile(model, (X,), str(recipe)), model, tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["compile", "tests.models:conv_bn_relu", "--recipe", str(recipe), "--out", str(out), "--no-baseline"]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_recipe_extends_cycle(model, tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    refused(RecipeError, r"extends itself \(cycle", lambda: fxcompress.compile(model, (X,), str(tmp_path / "a.toml")), model, tmp_path)


@pytest.mark.parametrize("recipe, match", [
    (["fold-batchnrom"], r"Unknown pass 'fold-batchnrom'"),
    ([42], r"Recipe list item 42 is neither a pass name nor a Pass"),
    ("defualt", r"Unknown recipe 'defualt'"),
    ("missing.toml", r"Recipe file missing.toml does not exist"),
    (3.5, r"recipe must be a name, a path or a list, got float"),
])
def test_recipe_arguments_in_python(model, recipe, match):
    refused(RecipeError, match, lambda: fxcompress.compile(model, (X,), recipe), model)


# --- output paths -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    return fxcompress.compile(randomize_bn(ConvBnRelu()).eval(), (X,))


def test_export_into_a_missing_folder(compiled, tmp_path):
    refused(ExportError, r"Output folder .*nope does not exist.*mkdir -p", lambda: compiled.export_onnx(tmp_path / "nope" / "m.onnx"), folder=tmp_path)


def test_export_under_a_regular_file(compiled, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(ExportError, r"Output folder .*file is a file, not a folder", lambda: compiled.export_onnx(tmp_path / "file" / "m.onnx"), folder=tmp_path)


def test_export_onto_a_directory(compiled, tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    refused(ExportError, r"is a directory", lambda: compiled.export_onnx(tmp_path / "dir.onnx"), folder=tmp_path)


def test_export_into_a_folder_that_refuses_writes(compiled, tmp_path, monkeypatch):
    # Root ignores chmod, so the permission answer is mocked; /proc refuses new files even to root.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw))
    refused(ExportError, r"Output folder .* is not writable", lambda: compiled.export_onnx(tmp_path / "m.onnx"), folder=tmp_path)
    monkeypatch.undo()
    refused(ExportError, r"Output folder /proc is not writable", lambda: compiled.export_onnx("/proc/m.onnx"))


def test_cli_checks_the_output_path_before_compiling(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "nope" / "m.onnx", tmp_path / "file" / "m.onnx", Path("/proc/m.onnx")):
        assert main(["compile", "tests.models:conv_bn_relu", "--out", str(out), "--no-baseline"]) == 2
        captured = capsys.readouterr()
        assert "Output folder" in captured.err and "Compiling" not in captured.out
    assert _listing(tmp_path) == ["file"]


def test_dump_dir_that_cannot_be_created(model, tmp_path):
    (tmp_path / "file").write_text("x")
    options = fxcompress.CompileOptions(dump_dir=tmp_path / "file" / "dump")
    refused(InputError, r"dump folder .* cannot be used", lambda: fxcompress.compile(model, (X,), options=options),
            model, tmp_path)


def test_cli_bad_input_shape_and_spec(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    for argv, match in [
        (["compile", "tests.models:conv_bn_relu", "--input-shape", "1,x,8", "--out", str(out)], "is not a list of positive integers"),
        (["compile", "tests.models:conv_bn_relu", "--input-shape", "1,4,8,8", "--out", str(out), "--no-baseline"], "fails on the example inputs"),
        (["compile", "no_such_module:factory", "--out", str(out)], "Cannot import 'no_such_module'"),
        (["compile", "tests.models:NOPE", "--out", str(out)], "has no callable 'NOPE'"),
        (["compile", "model.onnx", "--out", str(out)], "Cannot tell what model"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (argv, err)
    assert not out.exists()


def test_two_input_model_with_inputs_swapped():
    model = TwoInputs().eval()
    ids, feats = torch.randint(0, 50, (2, 5)), torch.randn(2, 4)
    refused(InputError, r"fails on the example inputs \(float32\[2, 4\], int64\[2, 5\]\)", lambda: fxcompress.compile(model, (feats, ids)), model)


# --- large calibration sets stream ----------------------------------------------------------------


class CountingLoader:
    """A DataLoader-like re-iterable of ``total`` fresh batches that tracks how many are alive."""

    def __init__(self, total: int, shape=(1, 3, 8, 8)) -> None:
        self.total, self.shape = total, shape
        self.alive = self.peak = self.produced = 0

    def _release(self) -> None:
        self.alive -= 1

    def __iter__(self):
        for _ in range(self.total):
            batch = torch.randn(self.shape)
            self.alive += 1
            self.produced += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(batch, self._release)
            yield (batch,)


def test_calibration_streams_a_reiterable_without_holding_it():
    loader = CountingLoader(5000)
    context = CompileContext((X,), loader)
    for _ in range(2):  # a pass may read the data several times
        for batch in context.calibration:
            del batch
    assert loader.produced == 10000
    assert loader.peak <= 2, f"{loader.peak} batches were alive at once"


def test_calibration_generator_is_read_lazily_and_replayed_from_the_start():
    produced = []

    def gen():
        for i in range(5000):
            produced.append(i)
            yield (torch.full((1,), float(i)),)

    calibration = Calibration(gen(), (torch.zeros(1),))
    first = iter(calibration)
    assert [float(next(first)[0]) for _ in range(3)] == [0.0, 1.0, 2.0]
    assert len(produced) == 3  # nothing read ahead
    # A second pass starts from the first batch (before the fix it resumed at batch 3).
    assert [float(b[0]) for _, b in zip(range(5), calibration)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(produced) == 5
    # Another Calibration over it (compile_decoder's second graph) replays the same items, reading nothing twice.
    again = Calibration(calibration, (torch.zeros(1),))
    assert [float(b[0]) for b in again.take(None, "a pass", limit=6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert len(produced) == 6


@needs_int8
def test_int8_reads_a_bounded_prefix_of_thousands_of_batches(model):
    loader = CountingLoader(5000)
    gc.collect()
    fxcompress.compile(model, (X,), "int8", loader, tolerance=1.0)
    limit = 256  # quantize-int8's calibration_batches default
    assert loader.produced <= 2 * (limit + 1), f"read {loader.produced} of 5000 batches"
    assert loader.peak <= limit + 2, f"{loader.peak} batches alive at once"
