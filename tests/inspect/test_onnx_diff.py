"""ONNX diffs: op counts checkable by hand, alignment of renamed nodes, empty diffs, bad input."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest

import fxcompress
from fxcompress.errors import InputError, ModelFileError
from fxcompress.inspect.onnx_diff import diff_onnx
from tests.inspect.helpers import small_onnx


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _hand_count(path) -> dict[str, int]:
    """The op-count change a user would compute by hand from the two files."""
    return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def test_op_count_changes_match_counting_by_hand(tmp_path):
    a = _save(small_onnx(relu=True), tmp_path / "a.onnx")
    b = _save(small_onnx(relu=False, extra_add=True), tmp_path / "b.onnx")
    diff = diff_onnx(a, b)
    before, after = _hand_count(a), _hand_count(b)
    expected = {op: after.get(op, 0) - before.get(op, 0) for op in set(before) | set(after)}
    assert diff.op_delta == {op: d for op, d in sorted(expected.items()) if d} == {"Add": 1, "Relu": -1}
    assert [n.op_type for n in diff.removed] == ["Relu"] and [n.op_type for n in diff.added] == ["Add"]
    assert {new.op_type for _, new in diff.rewired} == {"Flatten"}  # now fed by Add instead of Relu
    assert diff.nodes_before == 4 and diff.nodes_after == 4
    assert diff.macs_before == diff.macs_after == 4 * 8 * 8 * 27 + 5 * 256
    # The shared diff record: one line of text (MACs unchanged, so not shown), plain data with the file sizes.
    assert str(diff) == diff.to_text() == "+1 Add, -1 Relu; nodes 4 -> 4; params 1,397 -> 1,397"
    data = diff.to_dict()
    assert data["op_delta"] == diff.op_delta and data["bytes_after"] == b.stat().st_size
    assert data["by_layer"] == diff.by_layer()


def test_renamed_nodes_and_tensors_align_by_structure(tmp_path):
    a = small_onnx(relu=True)
    b = small_onnx(relu=True, prefix="exported_")
    diff = diff_onnx(a, b)
    assert diff.empty
    assert {old.name: new.name for old, new in diff.renamed} == {
        "conv": "exported_conv", "relu": "exported_relu", "flatten": "exported_flatten", "fc": "exported_fc"}


def test_identical_models_give_an_empty_diff(tmp_path):
    path = _save(small_onnx(), tmp_path / "a.onnx")
    diff = fxcompress.diff(path, str(path))
    assert diff.empty and diff.op_delta == {} and not diff.renamed and diff.layer_deltas == {}


def test_exported_models_diff_by_layer(tmp_path):
    """Two real exports: a plain one and one after the default recipe (identity removed)."""
    import torch

    from tests.models import WithNoOps

    model, inputs = WithNoOps().eval(), (torch.randn(2, 16),)
    plain = fxcompress.compile(model, inputs, []).export_onnx(tmp_path / "plain.onnx")
    compiled = fxcompress.compile(model, inputs, "default").export_onnx(tmp_path / "default.onnx")
    diff = diff_onnx(plain, compiled)
    before, after = _hand_count(plain), _hand_count(compiled)
    assert diff.ops_before == Counter(before) and diff.ops_after == Counter(after)
    assert all(n.layer == "fc" for n in diff.added + diff.removed if n.op_type in ("Gemm", "MatMul"))


@pytest.mark.parametrize("bad", ["missing", "empty", "garbage", "folder"])
def test_bad_input_raises_a_clear_model_file_error(tmp_path, bad):
    good = _save(small_onnx(), tmp_path / "good.onnx")
    path = tmp_path / f"{bad}.onnx"
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "garbage":
        path.write_bytes(b"\x08\x07this is not a protobuf\xff\xff" * 10)
    elif bad == "folder":
        path.mkdir()
    with pytest.raises(ModelFileError) as info:
        diff_onnx(good, path)
    message = str(info.value)
    assert str(path) in message and "Fix:" in message and "Traceback" not in message


def test_mixing_onnx_and_graph_is_refused():
    import torch

    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="Cannot diff"):
        fxcompress.diff(small_onnx(), gm)
