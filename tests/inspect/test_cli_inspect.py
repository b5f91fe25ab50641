"""`fxcompress diff`, `fxcompress inspect` and `fxcompress compile --report`."""

from __future__ import annotations

import json
import re

import onnx
import pytest
import torch

from fxcompress.cli import main
from fxcompress.inspect.render_dot import dot_available
from tests.inspect.helpers import small_onnx


@pytest.fixture
def onnx_pair(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(small_onnx(relu=True), str(a))
    onnx.save(small_onnx(relu=False, extra_add=True), str(b))
    return a, b


def test_diff_two_onnx_files_prints_op_count_table(onnx_pair, tmp_path, capsys):
    a, b = onnx_pair
    html, dot = tmp_path / "d.html", tmp_path / "d.dot"
    assert main(["diff", str(a), str(b), "--html", str(html), "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
            for m in re.finditer(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+([+-]\d+)$", out, re.M)}
    assert rows == {"Add": (0, 1, 1), "Relu": (1, 0, -1)}
    assert "\033[" not in out  # captured output is not a terminal
    assert html.read_text().startswith("<!DOCTYPE html>") and dot.read_text().startswith("digraph")
    assert (tmp_path / "d.dot.svg").is_file() == dot_available()


def test_diff_passes_lists_folded_batch_norms(capsys):
    code = main(["diff", "--passes", "tests.inspect.helpers:residual", "--recipe", "default", "--only", "fold-batchnorm"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Diff remove-guards -> fold-batchnorm" in out
    assert "Removed aten.batch_norm (3): bn0, bn1, bn2\n" in out
    assert "Removed call_module" not in out  # the guard went in an earlier pass


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["diff", "nowhere/a.onnx", "nowhere/b.onnx"], "does not exist"),
        (["diff", "only-one.onnx"], "needs two ONNX files"),
        (["diff", "--passes", "tests.inspect.helpers:residual", "--recipe", "default", "--to", "no-such-pass"],
         "ran no pass named 'no-such-pass'"),
        (["inspect", "nowhere.onnx"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Fix:" in err and "Traceback" not in err


def test_diff_unreadable_onnx(onnx_pair, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 50)
    assert main(["diff", str(onnx_pair[0]), str(bad)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_inspect_onnx_text_and_json(onnx_pair, capsys):
    assert main(["inspect", str(onnx_pair[0])]) == 0
    out = capsys.readouterr().out
    assert re.search(r"MACs\s+8,192 ", out) and "CPUExecutionProvider" in out and "ai.onnx 17" in out
    assert main(["inspect", str(onnx_pair[0]), "--json", "--no-providers"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["histogram"] == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1} and info["providers"] == {}


def test_inspect_model_spec(capsys):
    assert main(["inspect", "tests.inspect.helpers:residual"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"aten.batch_norm\s+3", out) and "parameters" in out


def test_compile_writes_html_report(tmp_path, capsys):
    report = tmp_path / "report.html"
    assert main(["compile", "tests.inspect.helpers:residual", "--out", str(tmp_path / "m.onnx"), "--runs", "8",
                 "--report", str(report)]) == 0
    assert f"Wrote {report}" in capsys.readouterr().out
    page = report.read_text()
    assert "fold-batchnorm" in page and page.count('class="point"') == 2  # baseline and compiled variants
    assert "Per-layer precision and sparsity" in page


def test_compile_report_to_missing_folder_fails_before_work(tmp_path, capsys):
    assert main(["compile", "tests.inspect.helpers:residual", "--out", str(tmp_path / "m.onnx"),
                 "--report", str(tmp_path / "no" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_resnet18_diff_lists_exactly_the_folded_batch_norms(capsys):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    expected = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert main(["diff", "--passes", "torchvision:resnet18", "--recipe", "default", "--only", "fold-batchnorm"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Removed aten.batch_norm"))
    assert line == f"Removed aten.batch_norm ({len(expected)}): {', '.join(expected)}"


def test_dump_dir_writes_every_pass_and_the_tools_wrapper_does_the_same(tmp_path, capsys, monkeypatch):
    """``diff --passes SPEC --dump-dir DIR``: each changed pass's graph, diff and DOT under one number,
    and report.html; tools/dump_passes.py is a thin wrapper of it."""
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "cli"
    assert main(["diff", "--passes", "tests.inspect.helpers:residual", "--recipe", "default", "--dump-dir", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "000_captured.txt" in names and "report.html" in names
    folded = [n for n in names if "fold-batchnorm" in n]
    assert {Path(n).name.split(".", 1)[1] for n in folded} >= {"txt", "diff.txt", "dot"}
    assert (out / next(n for n in folded if n.endswith(".diff.txt"))).read_text().strip()
    tool = Path(__file__).parents[2] / "tools" / "dump_passes.py"
    wrapped = tmp_path / "tool"
    monkeypatch.setattr(sys, "argv", [str(tool), "tests.inspect.helpers:residual", "--dump-dir", str(wrapped)])
    try:
        runpy.run_path(str(tool), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code == 0
    assert sorted(p.name for p in wrapped.iterdir()) == names
