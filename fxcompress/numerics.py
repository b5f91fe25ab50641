"""Output comparison shared by the numerics instrument (torch vs torch) and ONNX parity (ORT vs torch).

``drift`` is the figure passes are judged by: the largest absolute error over an output divided by
that output's largest magnitude, so it reads as "relative to the output's scale" and does not blow
up on near-zero elements the way an element-wise relative error does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

#: Lossless passes must stay within this drift (fp32 rounding across a few reassociated ops).
LOSSLESS_TOLERANCE = 1e-4


def flatten_outputs(outputs: Any) -> list[np.ndarray]:
    """Tensors of a model's output (tensor, tuple, dict, HF ModelOutput...) as float64/int numpy arrays."""
    leaves = [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, (torch.Tensor, np.ndarray))]
    arrays = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach().cpu()
            if leaf.is_floating_point():
                leaf = leaf.to(torch.float64)
            leaf = leaf.numpy()
        arrays.append(np.asarray(leaf))
    return arrays


@dataclass
class OutputComparison:
    """How one output of a candidate differs from the reference."""

    index: int
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    drift: float
    cosine: float
    top1_agreement: float | None
    nonfinite: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compare_output(index: int, reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    """Compare one output. Shapes must match (callers check first and report mismatches)."""
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    nonfinite = int((~np.isfinite(got)).sum())
    diff = np.abs(ref - got)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    drift = max_abs / scale if scale > 0 else max_abs
    # Element-wise relative error, guarded so exact zeros in the reference do not dominate.
    denom = np.maximum(np.abs(ref), 1e-6 * max(scale, 1e-12))
    max_rel = float((diff / denom).max()) if diff.size else 0.0
    a, b = ref.ravel(), got.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        cosine = 1.0
    elif na == 0 or nb == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, b) / (na * nb))
    top1 = None
    # A 2-D [batch, classes] output with several classes is read as classifier logits.
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float((ref.argmax(axis=1) == got.argmax(axis=1)).mean())
    if nonfinite:
        drift = max_abs = max_rel = math.inf
        cosine = float("nan")
    return OutputComparison(index, tuple(ref.shape), max_abs, max_rel, drift, cosine, top1, nonfinite)


def signature(arrays: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype kind) per output: what passes must never change."""
    return [(tuple(a.shape), "float" if a.dtype.kind == "f" else str(a.dtype)) for a in arrays]


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> list[OutputComparison]:
    """Compare outputs pairwise; raises ValueError if count or shapes differ."""
    if len(reference) != len(candidate):
        raise ValueError(f"output count changed: {len(reference)} -> {len(candidate)}")
    for i, (r, c) in enumerate(zip(reference, candidate)):
        if tuple(r.shape) != tuple(c.shape):
            raise ValueError(f"output {i} shape changed: {tuple(r.shape)} -> {tuple(c.shape)}")
    return [compare_output(i, r, c) for i, (r, c) in enumerate(zip(reference, candidate))]


def worst_drift(comparisons: Sequence[OutputComparison]) -> float:
    """The largest drift over all outputs (0 for a model without float outputs)."""
    return max((c.drift for c in comparisons), default=0.0)
