"""GraphModule diffs: alignment by name, provenance and structure; layers; MACs; empty diffs."""

from __future__ import annotations

import copy

import torch

import fxcompress
from fxcompress.capture import capture
from fxcompress.analysis.graph_diff import diff_snapshots
from fxcompress.analysis.model_diff import ModelDiff
from fxcompress.analysis.snapshot import GraphSnapshot
from tests.inspect.helpers import FoldBatchNormForTests, RenameNodesForTests, residual
from tests.models import ConvBnRelu


def _compile(passes):
    model, inputs = residual()
    return model, fxcompress.compile(model, inputs, passes)


def test_fold_lists_exactly_the_folded_batch_norms_by_layer():
    model, result = _compile([FoldBatchNormForTests()])
    diff = result.snapshots.diff("captured", "test-fold-batchnorm")
    bn_layers = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert diff.removed_by_operation() == {"aten.batch_norm": bn_layers}
    assert diff.op_delta == {"aten.batch_norm": -3}
    assert isinstance(diff, ModelDiff) and diff.nodes_before - diff.nodes_after == 3
    assert str(diff).startswith("-3 aten.batch_norm; nodes ") and diff.to_dict()["op_delta"] == {"aten.batch_norm": -3}
    assert diff.ops_before["aten.batch_norm"] == 3 and diff.ops_after["aten.batch_norm"] == 0
    # The convs kept their names and are rewired to the folded weights; nothing else was added.
    assert {new.name for _, new in diff.rewired} >= {"conv2d", "conv2d_1", "conv2d_2"}
    assert {n.op for n in diff.added} == {"get_attr"}
    assert sorted({src for sources in diff.replaced.values() for src in sources}) == ["batch_norm", "batch_norm_1", "batch_norm_2"]
    # Added weights inherit the layer of the batch norm they came from (provenance).
    assert {n.layer for n in diff.added} == {"bn0", "bn1", "bn2"}
    assert diff.macs_before == diff.macs_after > 0
    assert not diff.renamed and not diff.empty


def test_renamed_nodes_are_aligned_not_reported_as_added_and_removed():
    _, result = _compile([RenameNodesForTests()])
    diff = result.snapshots.diff("captured", "test-rename-nodes")
    assert diff.empty
    assert not diff.added and not diff.removed and not diff.rewired
    renamed = {old.name: new.name for old, new in diff.renamed}
    assert renamed["conv2d"] == "conv2d_r" and renamed["linear"] == "linear_r"
    assert len(renamed) == len([n for n in diff.ops_after.elements()]) - 1  # every call_function but _guards_fn (call_module)


def test_rename_after_fold_still_lists_only_the_folds():
    _, result = _compile([FoldBatchNormForTests(), RenameNodesForTests()])
    diff = result.snapshots.diff("captured", "test-rename-nodes")
    assert diff.removed_by_operation() == {"aten.batch_norm": ["bn0", "bn1", "bn2"]}
    assert diff.added_by_operation() == {}
    # The residual add was renamed *and* rewired (its input batch norm is gone): still one node.
    rewired = {new.name: old.inputs for old, new in diff.rewired}
    assert rewired["add_r"] == ("batch_norm_2", "relu__r")


def test_identical_graphs_give_an_empty_diff():
    model, inputs = residual()
    gm = capture(model, inputs)
    a, b = GraphSnapshot.of(gm, "a"), GraphSnapshot.of(copy.deepcopy(gm), "b")
    diff = diff_snapshots(a, b)
    assert diff.empty and not diff.renamed and diff.op_delta == {} and diff.layer_deltas == {}
    assert fxcompress.diff(gm, gm).empty


def test_macs_of_conv_and_linear_match_hand_count():
    model = ConvBnRelu(channels=8, classes=10).eval()
    snap = GraphSnapshot.of(capture(model, (torch.randn(1, 3, 6, 6),)), "s")
    by_op = {n.operation: n.macs for n in snap.nodes if n.macs}
    assert by_op == {"aten.conv2d": 8 * 6 * 6 * 3 * 3 * 3, "aten.linear": 10 * 8}
    assert snap.layer_totals()["conv"] == {"params": 8 * 3 * 3 * 3 + 8, "macs": 8 * 6 * 6 * 27}


def test_retyped_and_annotated_nodes_are_reported():
    model, inputs = residual()
    gm = capture(model, inputs)
    before = GraphSnapshot.of(gm, "before")
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    conv.meta["fxcompress_fused_activation"] = "relu_"
    conv.meta["val"] = conv.meta["val"].to(torch.float16)
    diff = diff_snapshots(before, GraphSnapshot.of(gm, "after"))
    assert [new.name for _, new in diff.retyped] == ["conv2d"]
    assert [new.name for _, new in diff.annotated] == ["conv2d"]
    text = diff.by_layer()["stem"]
    assert "float32" in text["retyped"][0] and "float16" in text["retyped"][0]
    assert text["annotated"] == ["conv2d: +fxcompress_fused_activation=relu_"]
