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
#: Export parity of a bf16 / fp16 model, in units of its dtype's epsilon: ORT computes a bf16 model
#: in float32 (fxcompress.export.half) and fp16 ops with its own accumulation order, so the file and
#: the compiled module differ by half-precision rounding. Measured (tiny Llama and CNN, 2026-12-07):
#: bf16 drift 2.1e-3 to 3.9e-3 (0.3-0.5 eps), fp16 6.1e-4 to 7.3e-4 (0.6-0.75 eps); 8 eps leaves room
#: for deeper models and still fails a wrong graph (errors of the output's own scale).
HALF_PARITY_EPS = 8


def float_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """``module``'s float parameters and buffers, each tensor once."""
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
    return list(unique.values())


def model_float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The float dtype holding most of ``module``'s parameter and buffer elements (float32 if none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in float_tensors(module):
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.nelement()
    return max(counts, key=counts.get) if counts else torch.float32


def half_parity_floor(dtype: torch.dtype) -> float:
    """The smallest export-parity drift bound for a model held in ``dtype`` (LOSSLESS_TOLERANCE for float32)."""
    if dtype in (torch.float16, torch.bfloat16):
        return HALF_PARITY_EPS * torch.finfo(dtype).eps
    return LOSSLESS_TOLERANCE


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
    """How one output of a candidate differs from the reference: the one per-output record.

    It is what one comparison on one input set gives (:func:`compare_output`), and, worst over
    several input sets, what reports list per output (``CompileReport.outputs``,
    ``ParityReport.outputs``, :func:`fxcompress.fidelity.output_fidelity`).

    The figures are over the whole output. Where a mask applies (the padded positions of a
    ``[batch, sequence, ...]`` output excluded by an attention mask, see
    :mod:`fxcompress.fidelity`), ``masked`` holds the same figures over the positions the mask
    keeps, and those are the ones tolerances judge (:attr:`judged`).
    """

    index: int
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    drift: float
    cosine: float
    top1_agreement: float | None
    nonfinite: int
    #: ||candidate - reference|| / ||reference|| (root-mean-square error relative to the output's RMS)
    rel_rms: float = 0.0
    name: str = ""
    masked: OutputComparison | None = None

    @property
    def judged(self) -> OutputComparison:
        """The figures a tolerance is checked against: the masked ones where a mask applies."""
        return self.masked if self.masked is not None else self

    @property
    def masked_drift(self) -> float | None:
        """The drift over the positions the mask keeps; None where no mask applies."""
        return self.masked.drift if self.masked is not None else None

    @property
    def judged_drift(self) -> float:
        """The drift a tolerance is checked against: masked where a mask applies."""
        return self.judged.drift

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): the figures over the whole output, ``masked_drift``, and the
        masked figures under ``masked`` (None without a mask)."""
        data = {k: v for k, v in self.__dict__.items() if k != "masked"}
        data["shape"] = list(self.shape)
        data["masked_drift"] = self.masked_drift
        data["masked"] = self.masked.to_dict() if self.masked is not None else None
        return data

    def to_text(self) -> str:
        """One line: name, shape, drift (and masked drift), then the judged rel. RMS error and cosine."""
        masked = f", masked drift {self.masked_drift:.2e}" if self.masked is not None else ""
        return (f"{self.name or f'output_{self.index}'} {list(self.shape)}: drift {self.drift:.2e}{masked}, "
                f"rel. RMS {self.judged.rel_rms:.2e}, cosine {self.judged.cosine:.6f}")

    def __str__(self) -> str:
        return self.to_text()


def _figures(ref: np.ndarray, got: np.ndarray, classifier: bool) -> dict[str, Any]:
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
    error = float(np.linalg.norm(a - b))
    rel_rms = error / float(na) if na > 0 else error
    if na == 0 and nb == 0:
        cosine = 1.0
    elif na == 0 or nb == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, b) / (na * nb))
    top1 = None
    # A 2-D [batch, classes] output with several classes is read as classifier logits.
    if classifier and ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float((ref.argmax(axis=1) == got.argmax(axis=1)).mean())
    if nonfinite:
        drift = max_abs = max_rel = rel_rms = math.inf
        cosine = float("nan")
    return {"max_abs": max_abs, "max_rel": max_rel, "drift": drift, "cosine": cosine, "top1_agreement": top1,
            "nonfinite": nonfinite, "rel_rms": rel_rms}


def compare_output(index: int, reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None = None,
                   name: str = "") -> OutputComparison:
    """Compare one output. Shapes must match (callers check first and report mismatches).

    ``mask``: a boolean array whose shape is the output's leading dimensions (``[batch, sequence]``
    of a ``[batch, sequence, hidden]`` output); the figures over the positions it keeps go into
    ``masked``. This is the one place masking is computed.
    """
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    result = OutputComparison(index, tuple(ref.shape), name=name, **_figures(ref, got, classifier=True))
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or tuple(mask.shape) != tuple(ref.shape[:mask.ndim]):
            raise ValueError(f"output {index}: mask of {mask.dtype}{list(mask.shape)} does not fit shape {list(ref.shape)}")
        # Boolean indexing over the leading dims keeps the trailing ones: [B, S, H] -> [kept, H].
        result.masked = OutputComparison(index, tuple(ref.shape), name=name,
                                         **_figures(ref[mask], got[mask], classifier=False))
    return result


def signature(arrays: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype kind) per output: what passes must never change."""
    return [(tuple(a.shape), "float" if a.dtype.kind == "f" else str(a.dtype)) for a in arrays]


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                    masks: Sequence[np.ndarray | None] | None = None,
                    names: Sequence[str] | None = None) -> list[OutputComparison]:
    """Compare outputs pairwise; raises ValueError if count or shapes differ.

    ``masks``: one boolean array or None per output (see :func:`compare_output`); ``names``: the
    outputs' names, carried into the comparisons.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"output count changed: {len(reference)} -> {len(candidate)}")
    for i, (r, c) in enumerate(zip(reference, candidate)):
        if tuple(r.shape) != tuple(c.shape):
            raise ValueError(f"output {i} shape changed: {tuple(r.shape)} -> {tuple(c.shape)}")
    masks = list(masks) if masks is not None else [None] * len(reference)
    names = list(names) if names is not None else [""] * len(reference)
    return [compare_output(i, r, c, m, n) for i, (r, c, m, n) in enumerate(zip(reference, candidate, masks, names))]


def worst_drift(comparisons: Sequence[OutputComparison]) -> float:
    """The largest drift over all outputs (0 for a model without float outputs).

    Masked where a mask applies (:attr:`OutputComparison.judged`): the figure tolerances gate on.
    """
    return max((c.judged.drift for c in comparisons), default=0.0)


def worst_unmasked_drift(comparisons: Sequence[OutputComparison]) -> float:
    """The largest drift over all outputs and all positions, masked ones included."""
    return max((c.drift for c in comparisons), default=0.0)


def output_scale(reference: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(max |x|, RMS of x) of a reference output over the positions ``mask`` keeps (all without one)."""
    ref = np.asarray(reference, dtype=np.float64)
    if mask is not None:
        ref = ref[np.asarray(mask)]
    if not ref.size:
        return 0.0, 0.0
    return float(np.abs(ref).max()), float(np.sqrt(np.mean(ref * ref)))


def error_against_scale(reference: np.ndarray, candidate: np.ndarray, scale: tuple[float, float],
                        mask: np.ndarray | None = None) -> tuple[float, float]:
    """(drift, relative RMS error) of ``candidate`` with the error divided by the larger of ``scale``
    (another input's (max, RMS), e.g. the outputs on real data) and this reference's own scale.

    What random inputs are judged by: a trained network's output on noise can be near zero (a text
    detector's score map peaks at 0.02 instead of 0.98), and ordinary quantization error divided by
    that reads as a 50% error. Dividing by the real outputs' scale (never by less than the output's
    own) keeps the figure meaningful, and it is never stricter than the own-scale figure.
    """
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    if mask is not None:
        ref, got = ref[np.asarray(mask)], got[np.asarray(mask)]
    if not ref.size:
        return 0.0, 0.0
    if not np.isfinite(got).all():
        return math.inf, math.inf
    own_max, own_rms = output_scale(ref)
    error = np.abs(ref - got)
    max_scale, rms_scale = max(scale[0], own_max), max(scale[1], own_rms)
    drift = float(error.max()) / max_scale if max_scale > 0 else float(error.max())
    rms = float(np.sqrt(np.mean(error * error)))
    return drift, (rms / rms_scale if rms_scale > 0 else rms)
