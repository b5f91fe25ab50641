"""Parity: does the ONNX model in ORT compute what the PyTorch model computes?

Runs with ORT graph optimizations off (so we test the exported graph, not ORT's rewrites of it),
on the example inputs and on extra random inputs of the same shapes and dtypes, and compares every
output: max abs / max rel error, drift, cosine similarity, top-1 agreement for classifier logits,
and a NaN/Inf count.

Where an output mask applies (the padded positions an ``attention_mask`` excludes, or the
``output_mask`` given; see :mod:`fxcompress.fidelity`) the figures, and the verdict, are over the
positions it keeps; ``unmasked_drift`` reports the drift over every position beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from fxcompress.capture import FlatCall, model_call, private_copy, run_eager
from fxcompress.fidelity import (
    MaskedFigures, OutputFidelity, OutputMask, check_output_mask, fidelity_table, output_fidelity, output_masks,
    output_tensors,
)
from fxcompress.numerics import LOSSLESS_TOLERANCE, OutputComparison, compare_outputs, flatten_outputs
from fxcompress.runtime.session import RuntimeSession, create_session


@dataclass
class ParityReport(MaskedFigures):
    """Worst-case figures over all inputs and outputs, plus the per-run details.

    ``drift``, ``max_abs``, ``max_rel``, ``cosine`` and ``nonfinite`` (and so ``passed``) are over
    the positions the output mask keeps where one applies; ``unmasked_drift`` is the drift over
    every position. ``outputs`` gives each output's figures (drift, masked drift, rel. RMS, cosine).
    """

    passed: bool
    tolerance: float
    max_abs: float
    max_rel: float
    drift: float
    cosine: float
    top1_agreement: float | None
    nonfinite: int
    runs: int
    provider: str
    comparisons: list[list[OutputComparison]] = field(default_factory=list)
    #: drift over every position, masked ones included (equal to ``drift`` without a mask)
    unmasked_drift: float | None = None
    outputs: list[OutputFidelity] = field(default_factory=list)

    def summary(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.1%}" if self.top1_agreement is not None else ""
        verdict = "PASS" if self.passed else "FAIL"
        masked = (f" masked, {self.unmasked_drift:.2e} over all positions"
                  if self.masked and self.unmasked_drift is not None else "")
        return (f"{verdict}: drift {self.drift:.2e}{masked} (tolerance {self.tolerance:.0e}), max abs {self.max_abs:.2e}, "
                f"cosine {self.cosine:.7f}{top1}, non-finite {self.nonfinite}, {self.runs} input sets on {self.provider}")

    def table(self) -> str:
        """Per-output figures (worst over the input sets) as aligned text."""
        return fidelity_table(self.outputs)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("comparisons", "outputs")}
        data["masked"] = self.masked
        data["outputs"] = [o.as_dict() for o in self.outputs]
        return data


def random_like(example: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random tensor of the same shape/dtype and roughly the same value range as ``example``."""
    if example.is_floating_point():
        std = float(example.float().std()) if example.numel() > 1 else 1.0
        mean = float(example.float().mean())
        std = std if np.isfinite(std) and std > 0 else 1.0
        noise = torch.randn(example.shape, generator=generator) * std + mean
        return noise.to(example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, example.shape, generator=generator).bool()
    low, high = int(example.min()), int(example.max())
    return torch.randint(low, high + 1, example.shape, generator=generator, dtype=example.dtype)


def input_sets(example_inputs: Sequence[torch.Tensor], random_inputs: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """The example inputs followed by ``random_inputs`` random sets of the same shapes."""
    generator = torch.Generator().manual_seed(seed)
    sets = [tuple(example_inputs)]
    for _ in range(random_inputs):
        sets.append(tuple(random_like(t, generator) for t in example_inputs))
    return sets


def validate(
    onnx_model: str | os.PathLike | bytes | onnx.ModelProto | RuntimeSession,
    model: nn.Module,
    example_inputs: Any,
    *,
    tolerance: float = LOSSLESS_TOLERANCE,
    random_inputs: int = 3,
    provider: str = "cpu",
    output_mask: OutputMask = None,
) -> ParityReport:
    """Compare the ONNX model in ORT with ``model`` in PyTorch.

    Args:
        onnx_model: path, bytes or ModelProto, or a session made with ``optimize=False`` (so that
            several checks of one model open it once).
        model: the PyTorch model (or compiled GraphModule) to compare with; it is copied and run
            in eval mode, never modified.
        example_inputs: the model's inputs in any form ``compile`` takes (tensor, tuple, dict of
            keyword tensors, ``(args, kwargs)``, nested lists).
        tolerance: largest accepted drift (max abs error / max magnitude, per output).
        random_inputs: extra random input sets of the same shapes.
        provider: "cpu" or "cuda".
        output_mask: which output positions count (fxcompress.fidelity): by default the
            positions an input named ``attention_mask`` keeps, in outputs whose leading dims are
            ``[batch, sequence]``; ``False`` for every position; an input's name; or a callable
            ``output_mask(inputs, outputs)``. Where a mask applies, the masked drift is the one
            checked against ``tolerance``; the drift over all positions is reported beside it.
    """
    check_output_mask(output_mask)
    call = model_call(model if isinstance(model, nn.Module) else None, example_inputs)
    inputs = call.flat
    if isinstance(onnx_model, (str, os.PathLike)):
        from fxcompress.export.onnx_export import load_onnx

        onnx_model = load_onnx(onnx_model)
    session = onnx_model if isinstance(onnx_model, RuntimeSession) else create_session(onnx_model, provider, optimize=False)
    reference_model = private_copy(model, share_parameters=True)  # its own modes and buffers, the same weights
    if call.structured:
        reference_model = FlatCall(reference_model, call)
    names = [o.name for o in session.session.get_outputs()]
    all_runs = []
    for feed in input_sets(inputs, random_inputs):
        raw = run_eager(reference_model, feed)
        expected = flatten_outputs(raw)
        got = [np.asarray(g) for g in session.run(feed)]
        if len(names) != len(expected):  # compare_outputs names the count mismatch
            names = None
        masks = output_masks(output_mask, call.names, feed, output_tensors(raw), names)
        all_runs.append(compare_outputs(expected, got, masks, names))
    whole = [c for run in all_runs for c in run]
    flat = [c.judged for c in whole]
    top1 = [c.top1_agreement for c in flat if c.top1_agreement is not None]
    report = ParityReport(
        passed=False,
        tolerance=tolerance,
        max_abs=max(c.max_abs for c in flat),
        max_rel=max(c.max_rel for c in flat),
        drift=max(c.drift for c in flat),
        cosine=min(c.cosine for c in flat),
        top1_agreement=min(top1) if top1 else None,
        nonfinite=sum(c.nonfinite for c in flat),
        runs=len(all_runs),
        provider=session.provider,
        comparisons=all_runs,
        unmasked_drift=max(c.drift for c in whole),
        outputs=output_fidelity(all_runs),
    )
    report.passed = report.nonfinite == 0 and report.drift <= tolerance
    return report
