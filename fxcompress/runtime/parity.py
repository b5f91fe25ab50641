"""Parity: does the ONNX model in ORT compute what the PyTorch model computes?

Runs with ORT graph optimizations off (so we test the exported graph, not ORT's rewrites of it).
Real inputs come first: the example inputs and any ``real_inputs`` given (export passes the first
calibration batches); their figures are the headline and are checked against the gate (a
:class:`~fxcompress.fidelity.Gate`: drift, relative RMS error, cosine per output). Random inputs of
the same shapes run in addition, judged by drift and relative RMS error *against the real outputs'
scale* (:func:`fxcompress.numerics.error_against_scale`): a trained network's output on noise can be
near zero, and an error divided by it means nothing. The report lists which input sets were used.

Where an output mask applies (the padded positions an ``attention_mask`` excludes, or the
``output_mask`` given; see :mod:`fxcompress.fidelity`) the figures, and the verdict, are over the
positions it keeps; ``unmasked_drift`` reports the drift over every position beside them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from fxcompress.capture import private_copy, run_eager
from fxcompress.inputs import FlatCall, model_call
from fxcompress.fidelity import (
    Gate, MaskedFigures, OutputMask, check_gate, check_output_mask, fidelity_table, output_fidelity,
    output_masks, output_tensors,
)
from fxcompress.numerics import (
    LOSSLESS_TOLERANCE, OutputComparison, compare_outputs, error_against_scale, flatten_outputs, output_scale,
)
from fxcompress.runtime.session import RuntimeSession, create_session


@dataclass
class ParityReport(MaskedFigures):
    """The verdict, the per-output figures it rests on, and the per-run details.

    ``outputs`` has one :class:`~fxcompress.numerics.OutputComparison` per output, over the real
    input sets pooled (the masked figures under ``masked``); the headline figures (``drift``,
    ``max_abs``, ``max_rel``, ``cosine``, ``rel_rms``, ``top1_agreement``, ``unmasked_drift``) are
    read off it, worst over the outputs, so they cannot disagree with it. They are over the
    positions the output mask keeps where one applies; ``unmasked_drift`` is the drift over every
    position. ``nonfinite`` counts non-finite values over every run, random ones included.
    """

    passed: bool
    nonfinite: int
    runs: int
    provider: str
    comparisons: list[list[OutputComparison]] = field(default_factory=list)
    outputs: list[OutputComparison] = field(default_factory=list)
    #: what each input set was, in order: "example", "calibration batch 1", ..., "random 1", ...
    inputs: list[str] = field(default_factory=list)
    #: the bounds the verdict applied (a number given as ``tolerance`` bounds the drift alone)
    gate: Gate = field(default_factory=Gate)
    #: on the random input sets: worst drift and relative RMS error against the real outputs' scale
    random_drift: float | None = None
    random_rel_rms: float | None = None
    #: why it failed, one phrase per broken bound (empty when it passed)
    failures: list[str] = field(default_factory=list)

    @property
    def tolerance(self) -> float:
        """The drift bound the verdict applied (``gate.drift``)."""
        return self.gate.drift

    @property
    def max_abs(self) -> float:
        """Largest absolute error over the outputs."""
        return max((o.judged.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        """Largest element-wise relative error over the outputs."""
        return max((o.judged.max_rel for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        """Smallest cosine similarity over the outputs."""
        return min((o.judged.cosine for o in self.outputs), default=1.0)

    @property
    def rel_rms(self) -> float:
        """Worst relative RMS error over the outputs."""
        return max((o.judged.rel_rms for o in self.outputs), default=0.0)

    @property
    def top1_agreement(self) -> float | None:
        """Lowest top-1 agreement over the classifier-shaped outputs; None without one."""
        top1 = [o.judged.top1_agreement for o in self.outputs if o.judged.top1_agreement is not None]
        return min(top1) if top1 else None

    @property
    def real_inputs(self) -> list[str]:
        """The input sets that came from the caller (example, calibration batches), not random."""
        return [name for name in self.inputs if not name.startswith("random")]

    def to_text(self) -> str:
        """One line: the verdict, the figures against the bounds, the input sets and the provider
        (:meth:`table` gives the per-output figures)."""
        top1 = f", top-1 agreement {self.top1_agreement:.1%}" if self.top1_agreement is not None else ""
        verdict = "PASS" if self.passed else "FAIL"
        masked = (f" masked, {self.unmasked_drift:.2e} over all positions"
                  if self.masked and self.unmasked_drift is not None else "")
        real = self.real_inputs or ["example"]
        random = len(self.inputs) - len(real)
        extra = (f"; {random} random input set(s): drift {self.random_drift:.2e}, rel. RMS {self.random_rel_rms:.2e} "
                 "against the real outputs' scale" if random and self.random_drift is not None else "")
        why = f" [{'; '.join(self.failures)}]" if self.failures else ""
        return (f"{verdict}: drift {self.drift:.2e}{masked}, rel. RMS {self.rel_rms:.2e}, cosine {self.cosine:.7f} "
                f"(bounds: {self.gate.describe()}), max abs {self.max_abs:.2e}{top1}, non-finite {self.nonfinite}, on "
                f"{_plural(real)}{extra}, {self.provider}{why}")

    def table(self) -> str:
        """Per-output figures (worst over the input sets) as aligned text."""
        return fidelity_table(self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): the figures, the bounds, the verdict and the per-output figures."""
        return {"passed": self.passed, "tolerance": self.tolerance, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "drift": self.drift, "cosine": self.cosine, "top1_agreement": self.top1_agreement,
                "nonfinite": self.nonfinite, "runs": self.runs, "provider": self.provider,
                "unmasked_drift": self.unmasked_drift, "inputs": list(self.inputs), "rel_rms": self.rel_rms,
                "random_drift": self.random_drift, "random_rel_rms": self.random_rel_rms,
                "failures": list(self.failures), "masked": self.masked, "gate": self.gate.to_dict(),
                "outputs": [o.to_dict() for o in self.outputs]}

    def __str__(self) -> str:
        return self.to_text()


def _plural(names: Sequence[str]) -> str:
    """``example``, ``example and calibration batch 1``, ``example, calibration batch 1 and 2``."""
    calibration = [n.rsplit(" ", 1)[-1] for n in names if n.startswith("calibration")]
    parts = [n for n in names if not n.startswith("calibration")]
    if calibration:
        parts.append(f"calibration batch{'es' if len(calibration) > 1 else ''} {', '.join(calibration)}")
    return " and ".join(parts)


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
    tolerance: float | Gate | dict = LOSSLESS_TOLERANCE,
    random_inputs: int = 3,
    provider: str = "cpu",
    output_mask: OutputMask = None,
    real_inputs: Sequence[Any] = (),
) -> ParityReport:
    """Compare the ONNX model in ORT with ``model`` in PyTorch.

    Args:
        onnx_model: path, bytes or ModelProto, or a session made with ``optimize=False`` (so that
            several checks of one model open it once).
        model: the PyTorch model (or compiled GraphModule) to compare with; it is copied and run
            in eval mode, never modified.
        example_inputs: the model's inputs in any form ``compile`` takes (tensor, tuple, dict of
            keyword tensors, ``(args, kwargs)``, nested lists).
        tolerance: the acceptance bounds per output: a number bounds the drift (max abs error /
            max magnitude); a :class:`~fxcompress.fidelity.Gate`, or a dict with keys ``drift``,
            ``rel_rms``, ``cosine`` bounds the measures it names (docs/fidelity.md).
        random_inputs: extra random input sets of the same shapes, judged against the scale of
            the outputs on the real inputs (drift and relative RMS error; cosine is not judged there).
        provider: "cpu" or "cuda".
        output_mask: which output positions count (fxcompress.fidelity): by default the
            positions an input named ``attention_mask`` keeps, in outputs whose leading dims are
            ``[batch, sequence]``; ``False`` for every position; an input's name; or a callable
            ``output_mask(inputs, outputs)``. Where a mask applies, the masked figures are the
            ones checked; the drift over all positions is reported beside them.
        real_inputs: more real input sets (each in the example's form, e.g. calibration batches),
            compared and judged like the example.
    """
    check_output_mask(output_mask)
    check_gate(tolerance)
    # A number bounds the drift alone (as always); a dict bounds the measures it names, the others unbounded.
    gate = Gate(float(tolerance)) if isinstance(tolerance, (int, float)) else Gate(math.inf).merged(tolerance)
    call = model_call(model if isinstance(model, nn.Module) else None, example_inputs)
    module = model if isinstance(model, nn.Module) else None
    real = [tuple(call.flat)] + [tuple(model_call(module, batch).flat) for batch in real_inputs]
    labels = ["example"] + [f"calibration batch {i + 1}" for i in range(len(real_inputs))]
    generator = torch.Generator().manual_seed(0)
    random_sets = [tuple(random_like(t, generator) for t in call.flat) for _ in range(random_inputs)]
    if isinstance(onnx_model, (str, os.PathLike)):
        from fxcompress.export.onnx_export import load_onnx

        onnx_model = load_onnx(onnx_model)
    session = onnx_model if isinstance(onnx_model, RuntimeSession) else create_session(onnx_model, provider, optimize=False)
    reference_model = private_copy(model, share_parameters=True)  # its own modes and buffers, the same weights
    if call.structured:
        reference_model = FlatCall(reference_model, call)
    names = [o.name for o in session.session.get_outputs()]

    def run(feed: tuple[torch.Tensor, ...]) -> tuple[list[np.ndarray], list[np.ndarray], list]:
        nonlocal names
        raw = run_eager(reference_model, feed)
        expected = flatten_outputs(raw)
        got = [np.asarray(g) for g in session.run(feed)]
        if names is not None and len(names) != len(expected):  # compare_outputs names the count mismatch
            names = None
        return expected, got, output_masks(output_mask, call.names, feed, output_tensors(raw), names)

    real_runs, scales, pooled = [], None, None
    for feed in real:
        expected, got, masks = run(feed)
        real_runs.append(compare_outputs(expected, got, masks, names))
        run_scales = [output_scale(e, m) if e.dtype.kind == "f" else (0.0, 0.0) for e, m in zip(expected, masks)]
        scales = run_scales if scales is None else [(max(a[0], b[0]), max(a[1], b[1])) for a, b in zip(scales, run_scales)]
        pooled = _pool(pooled, expected, got, masks)
    random_runs, random_figures = [], []
    for feed in random_sets:
        expected, got, masks = run(feed)
        random_runs.append(compare_outputs(expected, got, masks, names))
        random_figures += [error_against_scale(e, g, scale, m) for e, g, m, scale in zip(expected, got, masks, scales)
                           if e.dtype.kind == "f"]
    # The verdict on real data is over all real sets pooled per output: one set whose output is near
    # silent (a calibration image without text) must not turn rounding noise into a 100% error.
    outputs = _pooled_fidelity(pooled, real_runs)
    failures = gate.failures(outputs)
    nonfinite = sum(c.judged.nonfinite for run_ in real_runs + random_runs for c in run_)
    if nonfinite:
        failures.append(f"{nonfinite} non-finite output values")
    random_drift = max((d for d, _ in random_figures), default=0.0) if random_runs else None
    random_rel_rms = max((r for _, r in random_figures), default=0.0) if random_runs else None
    if random_runs and not random_drift <= gate.drift:
        failures.append(f"drift {random_drift:.3g} on random inputs (against the real outputs' scale) is above the bound "
                        f"{gate.drift:g}")
    if random_runs and not random_rel_rms <= gate.rel_rms:
        failures.append(f"relative RMS error {random_rel_rms:.3g} on random inputs (against the real outputs' scale) is "
                        f"above the bound {gate.rel_rms:g}")
    return ParityReport(
        passed=not failures,
        nonfinite=nonfinite,
        runs=len(real_runs) + len(random_runs),
        provider=session.provider,
        comparisons=real_runs + random_runs,
        outputs=outputs,
        inputs=labels + [f"random {i + 1}" for i in range(len(random_runs))],
        gate=gate,
        random_drift=random_drift,
        random_rel_rms=random_rel_rms,
        failures=failures,
    )


def _pool(pooled: list | None, expected: Sequence[np.ndarray], got: Sequence[np.ndarray],
          masks: Sequence[np.ndarray | None]) -> list:
    """Append one real run's outputs, flattened (all positions) and masked (kept positions), to ``pooled``."""
    pooled = pooled if pooled is not None else [([], [], [], []) for _ in expected]
    for (all_ref, all_got, kept_ref, kept_got), e, g, m in zip(pooled, expected, got, masks):
        all_ref.append(np.asarray(e, dtype=np.float64).ravel())
        all_got.append(np.asarray(g, dtype=np.float64).ravel())
        if m is not None:
            kept_ref.append(np.asarray(e, dtype=np.float64)[m].ravel())
            kept_got.append(np.asarray(g, dtype=np.float64)[m].ravel())
    return pooled


def _pooled_fidelity(pooled: list, runs: Sequence[Sequence[OutputComparison]]) -> list[OutputComparison]:
    """Per-output figures over every real input set at once (masked where a mask applied)."""
    from fxcompress.numerics import compare_output

    rows = []
    for (all_ref, all_got, kept_ref, kept_got), per_run in zip(pooled, zip(*runs)):
        c = per_run[0]
        name = c.name or f"output_{c.index}"
        # Top-1 agreement needs the [batch, classes] layout the flat pooled arrays lose: worst over the runs.
        top1 = [r.top1_agreement for r in per_run if r.top1_agreement is not None]
        # The pooled arrays are flat: the record keeps the output's own shape.
        whole = replace(compare_output(c.index, np.concatenate(all_ref), np.concatenate(all_got), name=name), shape=c.shape,
                        top1_agreement=min(top1) if top1 else None)
        if kept_ref:
            whole.masked = replace(compare_output(c.index, np.concatenate(kept_ref), np.concatenate(kept_got), name=name),
                                   shape=c.shape)
        rows.append(whole)
    return rows
