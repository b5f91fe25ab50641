"""Compare a compiled model with the plain export of the original, the way a user decides.

:func:`compare` puts the compiled result's ONNX model beside the plain ``torch.onnx.export`` of
the original model (the baseline a user would ship without fxcompress): parity of each against the
original PyTorch model in ONNX Runtime, latency timed interleaved in one process (so machine noise
hits both alike), file sizes, and the execution provider that actually ran. Parity is reported
per output too: drift, drift over the positions an output mask keeps (padding excluded by an
``attention_mask``), relative RMS error and cosine similarity. The CLI's ``compile``
command prints its report; nothing here is CLI-only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from fxcompress.api import CompileOptions, CompileResult, compile as compile_model
from fxcompress.errors import InputError
from fxcompress.fidelity import OutputMask, check_output_mask
from fxcompress.inspect.render_html import Variant
from fxcompress.numerics import LOSSLESS_TOLERANCE
from fxcompress.runtime.parity import ParityReport, validate
from fxcompress.runtime.session import create_session
from fxcompress.runtime.timing import make_runner, time_interleaved

BASELINE_LABEL = "plain torch.onnx.export"
_BLOCK = 8  # timed runs per variant per interleaved round


@dataclass
class VariantFigures:
    """One ONNX model in the comparison: its parity against the original, latency and size."""

    label: str
    size_bytes: int
    parity: ParityReport
    p50_ms: float
    p90_ms: float
    provider: str


@dataclass
class ComparisonReport:
    """What :func:`compare` measured; ``variants`` lists the baseline first (when timed)."""

    variants: list[VariantFigures]
    requested_provider: str
    fell_back: bool
    runs: int
    notes: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        """The provider the sessions actually ran on ("cpu"/"cuda")."""
        return self.variants[0].provider

    @property
    def compiled(self) -> VariantFigures:
        """The compiled model's figures (the last variant)."""
        return self.variants[-1]

    @property
    def speedup(self) -> float | None:
        """Baseline p50 latency over the compiled model's, or None without a baseline."""
        labels = [v.label for v in self.variants]
        if BASELINE_LABEL not in labels or len(self.variants) < 2:
            return None
        return self.variants[0].p50_ms / self.variants[-1].p50_ms

    def report_variants(self) -> list[Variant]:
        """The figures in the form the HTML report's latency/size chart takes."""
        return [Variant(v.label, v.p50_ms, v.p90_ms, v.size_bytes, v.provider) for v in self.variants]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): every variant's figures, the provider and the speedup."""
        return {
            "provider": self.provider, "requested_provider": self.requested_provider, "fell_back": self.fell_back,
            "runs_per_variant": self.runs, "speedup": self.speedup, "notes": list(self.notes),
            "variants": [{**{k: v for k, v in asdict(f).items() if k != "parity"},
                          "parity": {"passed": f.parity.passed, "drift": f.parity.drift,
                                     "unmasked_drift": f.parity.unmasked_drift, "masked": f.parity.masked,
                                     "cosine": f.parity.cosine, "outputs": [o.to_dict() for o in f.parity.outputs]}}
                         for f in self.variants],
        }

    def to_text(self) -> str:
        """The table the CLI prints: parity vs the original, p50/p90 latency, size, speedup, then
        the compiled model's per-output figures."""
        fallback = f", FELL BACK from {self.requested_provider}" if self.fell_back else ""
        lines = [f"Against the original model, on ONNX Runtime ({self.provider} provider{fallback}; "
                 f"{self.runs} runs each, interleaved):",
                 f"{'variant':<30} {'p50 ms':>9} {'p90 ms':>9} {'size MB':>9}  parity vs original"]
        for v in self.variants:
            lines.append(f"{v.label:<30} {v.p50_ms:>9.3f} {v.p90_ms:>9.3f} {v.size_bytes / 1e6:>9.2f}  {v.parity.to_text()}")
        if self.speedup is not None:
            lines.append(f"speedup over plain export: {self.speedup:.2f}x")
        if self.compiled.parity.outputs:
            lines.append(f"Per output, {self.compiled.label} vs the original (worst over {self.compiled.parity.runs} input sets):")
            lines.append(self.compiled.parity.table())
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _model_bytes(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto | str, int]:
    if isinstance(model, onnx.ModelProto):
        return model, model.ByteSize()
    path = Path(model)
    if not path.is_file():
        raise InputError(f"compare: the ONNX file {path} does not exist.",
                         "pass the path result.export_onnx(...) returned, or leave onnx_model out to export in memory.")
    return str(path), path.stat().st_size


def compare(
    result: CompileResult,
    original: nn.Module,
    onnx_model: onnx.ModelProto | str | os.PathLike | None = None,
    *,
    provider: str = "cpu",
    baseline: bool = True,
    runs: int = 48,
    output_mask: OutputMask = None,
) -> ComparisonReport:
    """Compare ``result`` with the plain ONNX export of ``original`` on ONNX Runtime.

    Args:
        result: what :func:`fxcompress.compile` returned for ``original``.
        original: the user's model (not modified; the baseline is exported from a private copy).
        onnx_model: the compiled model's ONNX file or ModelProto; None exports it in memory
            (``result.export_proto()``, parity-checked against ``result.module``).
        provider: "cpu" or "cuda"; the report says which provider actually ran.
        baseline: also export and time the plain export of ``original``.
        runs: timed runs per variant, in interleaved blocks of 8.
        output_mask: which output positions parity counts (default: compile's, see
            :func:`fxcompress.compile`); where a mask applies (by default the padding an
            ``attention_mask`` excludes) the masked drift is checked against the tolerance and
            the drift over all positions is reported beside it.

    Parity of each ONNX model is measured against ``original`` at the tolerance compile was
    given (``tolerance=``, else the recipe's; at least the lossless bound), so a lossy preset's drift shows here, not only in the
    compile report.
    """
    if not isinstance(result, CompileResult):
        raise InputError(f"compare: expected the CompileResult of fxcompress.compile, got {type(result).__name__}.",
                         "call result = fxcompress.compile(model, inputs, recipe) first and pass result.")
    if not isinstance(original, nn.Module):
        raise InputError(f"compare: the original model must be a torch.nn.Module, got {type(original).__name__}.",
                         "pass the model you compiled.")
    if not isinstance(runs, int) or runs < 1:
        raise InputError(f"compare: runs must be a positive integer, got {runs!r}.", "use e.g. runs=48.")
    check_output_mask(output_mask)
    mask = result.output_mask if output_mask is None else output_mask
    inputs = result.model_inputs
    tolerance = result.gate.with_drift_floor(LOSSLESS_TOLERANCE)  # compile's bounds, at least the lossless one
    models: dict[str, tuple[onnx.ModelProto | str, int]] = {}
    if baseline:
        plain = compile_model(original, inputs, [], options=CompileOptions(dynamic_batch=result.dynamic_batch,
                                                                          dynamic_sequence=result.dynamic_sequence))
        proto = plain.export_proto(validate=False)
        models[BASELINE_LABEL] = (proto, proto.ByteSize())
    compiled = result.export_proto() if onnx_model is None else onnx_model
    models[f"fxcompress {result.recipe.name}"] = _model_bytes(compiled)

    sessions = {label: create_session(model, provider) for label, (model, _) in models.items()}
    parity = {label: validate(model, original, inputs, tolerance=tolerance, output_mask=mask) for label, (model, _) in models.items()}
    rounds = max(1, runs // _BLOCK)
    stats = time_interleaved({label: make_runner(s, result.example_inputs) for label, s in sessions.items()},
                             rounds=rounds, block=_BLOCK)
    variants = [VariantFigures(label, models[label][1], parity[label], stats[label]["p50_ms"], stats[label]["p90_ms"],
                               sessions[label].provider) for label in models]
    first = next(iter(sessions.values()))
    return ComparisonReport(variants, provider, first.fell_back, rounds * _BLOCK)
