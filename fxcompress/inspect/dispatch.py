"""Choosing the right diff for two objects: ONNX models, GraphModules or graph snapshots."""

from __future__ import annotations

import os
from typing import Any

import onnx
from torch import fx

from fxcompress.errors import InputError
from fxcompress.analysis.graph_diff import GraphDiff, diff_snapshots
from fxcompress.inspect.onnx_diff import OnnxDiff, diff_onnx
from fxcompress.analysis.snapshot import GraphSnapshot


def _kind(value: Any) -> str:
    if isinstance(value, (str, os.PathLike, onnx.ModelProto)):
        return "onnx"
    if isinstance(value, (fx.GraphModule, GraphSnapshot)):
        return "graph"
    return type(value).__name__


def _snapshot(value: Any, label: str) -> GraphSnapshot:
    return value if isinstance(value, GraphSnapshot) else GraphSnapshot.of(value, label)


def diff_any(a: Any, b: Any) -> GraphDiff | OnnxDiff:
    """Diff ``a`` -> ``b``; both ONNX (paths or ModelProtos) or both graphs (GraphModules or snapshots)."""
    kinds = (_kind(a), _kind(b))
    if kinds == ("onnx", "onnx"):
        return diff_onnx(a, b)
    if kinds == ("graph", "graph"):
        return diff_snapshots(_snapshot(a, "a"), _snapshot(b, "b"))
    raise InputError(
        f"Cannot diff a {kinds[0]} against a {kinds[1]}.",
        "pass two ONNX models (paths or onnx.ModelProto) or two torch.fx GraphModules / graph snapshots; "
        "to compare a PyTorch model with an ONNX file, compile it and export it first.",
    )
