"""Text, DOT and HTML renderers: plain vs coloured text, highlighted DOT, huge graphs in seconds."""

from __future__ import annotations

import io
import time

import pytest
import torch

import fxcompress
from fxcompress.inspect.render_dot import dot_available, onnx_dot, snapshot_dot, to_svg
from fxcompress.inspect.render_html import render_diff_html, render_report_html
from fxcompress.inspect.render_text import render_graph_diff, render_near_misses, render_onnx_diff
from fxcompress.inspect.text_style import use_color
from fxcompress.inspect.onnx_diff import diff_onnx
from fxcompress.inspect.onnx_graph import OnnxGraph
from fxcompress.inspect.why_not import why_not
from tests.inspect.helpers import FoldBatchNormForTests, RenameNodesForTests, residual, small_onnx


@pytest.fixture(scope="module")
def folded():
    model, inputs = residual()
    return fxcompress.compile(model, inputs, [FoldBatchNormForTests()])


def test_text_is_plain_unless_colour_is_asked_for(folded, monkeypatch):
    diff = folded.snapshots.diff("captured", "test-fold-batchnorm")
    plain, coloured = render_graph_diff(diff), render_graph_diff(diff, color=True)
    assert "\033[" not in plain and "\033[31m" in coloured
    assert "Removed aten.batch_norm (3): bn0, bn1, bn2" in plain
    assert use_color(io.StringIO()) is False

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(Tty()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(Tty()) is False


def test_empty_diff_says_so():
    diff = diff_onnx(small_onnx(), small_onnx(prefix="p_"))
    text = render_onnx_diff(diff)
    assert "no changes" in text and "4 nodes renamed" in text
    assert "No changes (4 nodes renamed)" in render_diff_html(diff)


def test_dot_highlights_changes(folded):
    snaps = folded.snapshots.snapshots
    diff = folded.snapshots.diff("captured", "test-fold-batchnorm")
    dot = snapshot_dot(snaps[-1], diff, snaps[0])
    assert dot.startswith('digraph "captured -> test-fold-batchnorm"')
    assert dot.count("(removed)\" [label=") == 3  # the three batch norms, drawn dashed
    assert '"conv2d" -> "relu_"' in dot  # the relu is now fed by the conv
    svg = to_svg(dot)
    if dot_available():
        assert svg is not None and "<svg" in svg
    else:
        assert svg is None  # no Graphviz: skipped gracefully, no exception


def test_onnx_dot_and_near_miss_text():
    a, b = small_onnx(), small_onnx(relu=False)
    dot = onnx_dot(OnnxGraph(b), diff_onnx(a, b))
    assert '"relu (removed)"' in dot and '"<input:x>" -> "conv"' in dot
    assert "No near-misses" in render_near_misses({})


def test_why_not_reports_rejections_with_layers():
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is used twice: the fold must refuse

    result = fxcompress.compile(Shared().eval(), (torch.randn(1, 3, 6, 6),), [FoldBatchNormForTests()])
    misses = why_not(result)
    assert list(misses) == ["conv-bn"]
    (miss,) = misses["conv-bn"]
    assert (miss.layer, miss.node, miss.pass_name) == ("bn", "batch_norm", "test-fold-batchnorm")
    assert "used elsewhere" in render_near_misses(misses)
    assert "used elsewhere" in render_report_html(result)


def test_huge_graph_renders_in_seconds():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    result = fxcompress.compile(model, (torch.randint(0, 100, (1, 16)),), [RenameNodesForTests(), "remove-no-ops"])
    snaps = result.snapshots.snapshots
    assert len(snaps[0].nodes) > 250  # hundreds of nodes
    start = time.perf_counter()
    diff = fxcompress.diff(snaps[0], snaps[-1])
    text = render_graph_diff(diff)
    page = render_report_html(result)
    dot = snapshot_dot(snaps[-1], diff, snaps[0])
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"diff + text + HTML + DOT took {elapsed:.1f}s"
    assert len(diff.renamed) > 100 and "Changes by layer" in text
    assert page.count('class="pass ') == 2 and dot.count("[label=") > 150  # compute nodes drawn (weights are not)
    if dot_available():
        start = time.perf_counter()
        assert to_svg(dot) is not None
        assert time.perf_counter() - start < 30.0
