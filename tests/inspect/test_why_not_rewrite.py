"""why-not shows the rejections of RewritePass rules (the built-in fold-batchnorm here), in Python and
on the command line (compile --why-not)."""

from __future__ import annotations

import torch
from torch import nn

import fxcompress
from fxcompress.cli import main
from fxcompress.inspect.render_text import render_near_misses
from fxcompress.inspect.why_not import why_not
from fxcompress.passes.fold_batchnorm import FoldBatchNormPass
from fxcompress.rewrite import RewritePass


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv output is read twice: folding the batch norm into it must refuse


def shared_conv():
    return SharedConv().eval(), (torch.randn(1, 3, 6, 6),)


def test_why_not_lists_a_rewrite_pass_rejection_with_rule_reason_and_pass():
    assert issubclass(FoldBatchNormPass, RewritePass)
    result = fxcompress.compile(*shared_conv(), recipe=["fold-batchnorm"])
    misses = why_not(result)
    assert list(misses) == ["batchnorm-into-layer"]
    (miss,) = misses["batchnorm-into-layer"]
    assert miss.pass_name == "fold-batchnorm" and miss.layer == "bn"
    assert "also used by" in miss.reason
    assert "batchnorm-into-layer (1 near-miss)" in render_near_misses(misses)


def test_compile_cli_prints_why_not(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["compile", "tests.inspect.test_why_not_rewrite:shared_conv", "--recipe", "default", "--out", str(out),
            "--why-not", "--no-baseline", "--runs", "8"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Why not (rules that matched but declined)" in text
    assert "batchnorm-into-layer (1 near-miss)" in text and "bn [batch_norm]: output of 'conv2d' is also used by" in text


def test_diff_passes_why_not_and_the_tools_wrapper_print_the_same(capsys, monkeypatch):
    """tools/why_not.py is a thin wrapper of ``fxcompress diff --passes SPEC --why-not``."""
    import runpy
    import sys
    from pathlib import Path

    spec = "tests.inspect.test_why_not_rewrite:shared_conv"
    assert main(["diff", "--passes", spec, "--recipe", "default", "--why-not"]) == 0
    text = capsys.readouterr().out
    assert "Why not (rules that matched but declined)" in text
    assert "batchnorm-into-layer (1 near-miss)" in text and "bn [batch_norm]: output of 'conv2d' is also used by" in text
    tool = Path(__file__).parents[2] / "tools" / "why_not.py"
    monkeypatch.setattr(sys, "argv", [str(tool), spec, "--recipe", "default"])
    try:
        runpy.run_path(str(tool), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out == text


def test_why_not_needs_a_compile_run(capsys):
    assert main(["diff", "a.onnx", "b.onnx", "--why-not"]) == 2
    assert "need --passes SPEC" in capsys.readouterr().err
