"""Acceptance gates of lossy results (relative RMS error, cosine, drift per output) and parity on
real inputs first, random inputs judged against the real outputs' scale (docs/fidelity.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import DriftError, ExportError, InputError
from fxcompress.fidelity import Gate, check_gate
from fxcompress.numerics import OutputComparison
from fxcompress.numerics import error_against_scale
from fxcompress.passes.presets import PRESETS
from fxcompress.runtime.parity import validate


def _row(rel_rms=0.1, cosine=0.99, drift=0.05, name="out") -> OutputComparison:
    return OutputComparison(index=0, shape=(2, 3), max_abs=drift, max_rel=drift, drift=drift, cosine=cosine,
                            top1_agreement=None, nonfinite=0, rel_rms=rel_rms, name=name)


def test_gate_names_each_measure_that_fails():
    gate = Gate(drift=0.5, rel_rms=0.2, cosine=0.98)
    assert gate.failures([_row()]) == []
    failed = gate.failures([_row(rel_rms=0.3, cosine=0.8, drift=0.6, name="logits")])
    assert len(failed) == 3
    assert "relative RMS error 0.3 of output 'logits'" in failed[0]
    assert "cosine 0.8000 of output 'logits' is below the bound 0.98" in failed[1]
    assert "drift" in failed[2]
    assert gate.failures([_row(cosine=math.nan)])  # non-finite outputs never pass


def test_gate_overrides_number_dict_and_bad_values():
    gate = Gate(drift=0.5, rel_rms=0.2, cosine=0.98)
    assert gate.merged(None) == gate
    assert gate.merged(0.1) == Gate(0.1, math.inf, -1.0)  # a number is a drift bound alone, as tolerance always was
    assert gate.merged(math.inf) == Gate(math.inf, math.inf, -1.0)  # inf: accept whatever comes out
    assert gate.merged({"rel_rms": 0.4}) == Gate(0.5, 0.4, 0.98)
    assert Gate(1e-4, 0.2, 0.98).with_drift_floor(0.5) == Gate(0.5, 0.2, 0.98)
    for bad in (-1, "0.1", {"rms": 0.1}, {"cosine": 2}, math.nan, True):
        with pytest.raises(InputError, match="rel_rms"):
            check_gate(bad)


@pytest.mark.parametrize("preset", ["int8", "int8-dynamic", "fp16", "int4-weights", "int8-weights"])
def test_lossy_presets_refuse_a_broken_result(preset):
    """A result with cosine 0.8 (rel. RMS about 0.6) fails every lossy preset's gate, by name."""
    gate = PRESETS[preset]().gate
    failed = gate.failures([_row(rel_rms=0.62, cosine=0.8, drift=0.3)])
    assert any("cosine" in f for f in failed) and any("relative RMS" in f for f in failed)


def test_compile_drift_error_names_the_measure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    with pytest.raises(DriftError) as caught:
        fxcompress.compile(model, torch.randn(4, 256), "int8-dynamic", tolerance={"rel_rms": 1e-9})
    text = str(caught.value)
    assert "relative RMS error" in text and "the tolerance given" in text and "rel_rms" in text
    result = fxcompress.compile(model, torch.randn(4, 256), "int8-dynamic")
    assert result.report.gate == PRESETS["int8-dynamic"]().gate
    assert result.report.to_dict()["gate"]["rel_rms"] == result.gate.rel_rms


class TextDetectorLike(nn.Module):
    """Near-silent on noise: ~1 where the left half of the image is brighter than the right, ~0.0025 else."""

    def forward(self, x):
        contrast = x[..., :8].mean(dim=(1, 2, 3)) - x[..., 8:].mean(dim=(1, 2, 3))
        return torch.sigmoid(20 * contrast - 6).unsqueeze(1).expand(-1, 4)


class Shifted(nn.Module):
    """The detector plus an error: ``offset`` everywhere, and ``on_noise`` where the image has no contrast."""

    def __init__(self, offset: float, on_noise: float = 0.0) -> None:
        super().__init__()
        self.detector, self.offset, self.on_noise = TextDetectorLike(), offset, on_noise

    def forward(self, x):
        y = self.detector(x)
        contrast = x[..., :8].mean(dim=(1, 2, 3)) - x[..., 8:].mean(dim=(1, 2, 3))
        return y + self.offset + self.on_noise * torch.sigmoid(-20 * contrast).unsqueeze(1)


def _image() -> torch.Tensor:
    x = torch.zeros(1, 3, 16, 16)
    x[..., :8] = 1.0
    return x + 0.01 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _onnx(module: nn.Module, example: torch.Tensor):
    return fxcompress.compile(module, example, []).export_proto(validate=False)


def test_random_inputs_are_judged_against_the_real_outputs_scale():
    """An error of 0.01 on an output of ~1 passes a 0.05 bound; on noise the output is 0.0025 and the
    old figure (error / that output's maximum) read 4.0."""
    example = _image()
    report = validate(_onnx(Shifted(0.01), example), TextDetectorLike(), example, tolerance=0.05, random_inputs=2)
    assert report.passed, report.to_text()
    assert report.inputs == ["example", "random 1", "random 2"]
    assert report.drift == pytest.approx(0.01, rel=0.01)
    assert report.random_drift == pytest.approx(0.01, rel=0.05)
    own_scale = max(c.drift for run in report.comparisons[1:] for c in run)
    assert own_scale > 1.0  # what dividing by the near-silent output gave
    assert "on example; 2 random input set(s)" in report.to_text()


def test_an_error_only_on_random_inputs_is_still_caught():
    example = _image()
    report = validate(_onnx(Shifted(0.0, on_noise=0.3), example), TextDetectorLike(), example, tolerance=0.05,
                      random_inputs=2)
    assert not report.passed
    assert any("on random inputs" in f for f in report.failures)


def test_real_inputs_come_first_and_are_listed():
    example = _image()
    other = _image().flip(-1)  # a real input with the contrast the other way round: output ~0.0025
    report = validate(_onnx(TextDetectorLike(), example), TextDetectorLike(), example, real_inputs=[other],
                      random_inputs=1)
    assert report.passed and report.inputs == ["example", "calibration batch 1", "random 1"]
    assert "on example and calibration batch 1" in report.to_text()
    named = validate(_onnx(TextDetectorLike(), example), TextDetectorLike(), example, tolerance={"cosine": 0.9},
                     random_inputs=0)
    assert named.gate == Gate(math.inf, math.inf, 0.9) and named.passed and named.inputs == ["example"]


def test_error_against_scale_never_stricter_than_own_scale():
    ref, got = np.array([2.0, -1.0]), np.array([2.1, -1.0])
    drift, rel = error_against_scale(ref, got, (0.5, 0.1))
    assert drift == pytest.approx(0.05) and rel == pytest.approx(np.sqrt(0.005) / np.sqrt(2.5))
    drift, _ = error_against_scale(ref, got, (10.0, 5.0))
    assert drift == pytest.approx(0.01)
    assert error_against_scale(ref, np.array([np.inf, 0.0]), (1.0, 1.0)) == (math.inf, math.inf)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def test_export_parity_runs_on_calibration_batches_and_names_them():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    calibration = [torch.randn(1, 3, 12, 12) for _ in range(4)] + [torch.randn(2, 3, 12, 12)]
    result = fxcompress.compile(model, torch.randn(1, 3, 12, 12), "int8", calibration=calibration)
    result.export_proto()
    assert result.report.parity.inputs == ["example", "calibration batch 1", "calibration batch 2", "random 1"]
    assert result.report.parity.gate == result.gate.with_drift_floor(1e-4)


def test_export_error_names_the_measure_and_only_fixes_that_can_help(monkeypatch):
    import fxcompress.api as api

    torch.manual_seed(0)
    model = SmallCNN().eval()
    result = fxcompress.compile(model, torch.randn(1, 3, 12, 12), "int8", calibration=[torch.randn(1, 3, 12, 12)])
    checked = api.validate_onnx

    def failing(*args, **kwargs):  # ORT's Q/DQ matches the fake quantization here: make the check fail
        report = checked(*args, **kwargs)
        report.passed, report.failures = False, ["relative RMS error 0.5 of output 'output' is above the bound 0.4"]
        return report

    monkeypatch.setattr(api, "validate_onnx", failing)
    with pytest.raises(ExportError) as caught:
        result.export_proto()
    text = str(caught.value)
    assert "relative RMS error" in text and "calibration batch 1" in text and "tolerance={'rel_rms'" in text
    assert "simplify=False" not in text
    with pytest.raises(ExportError, match="simplify=False"):
        result.export_proto(simplify=True)


class PaddedNoise(nn.Module):
    """A keyword encoder; ``noise`` is added only at the padded positions."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.proj, self.noise = nn.Embedding(50, 16), nn.Linear(16, 16), noise

    def forward(self, input_ids, attention_mask):
        hidden = self.proj(self.embed(input_ids))
        return hidden + self.noise * (1 - attention_mask.unsqueeze(-1).to(hidden.dtype))


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0)), mask


def test_sensitivity_drift_counts_only_kept_positions():
    from fxcompress.analysis.sensitivity import drift_on_batches, masked_by

    batch = _padded()
    reference, candidate = PaddedNoise().eval(), PaddedNoise(noise=5.0).eval()
    candidate.load_state_dict(reference.state_dict())
    assert drift_on_batches(reference, candidate, [batch]) > 0.5
    with masked_by(None, ["input_ids", "attention_mask"]):  # compile binds this: the automatic attention_mask
        assert drift_on_batches(reference, candidate, [batch]) == 0.0
    with masked_by(False, ["input_ids", "attention_mask"]):
        assert drift_on_batches(reference, candidate, [batch]) > 0.5


class PaddedGarbage(PaddedNoise):
    """Padded positions: the difference of the projection at inputs 1e-3 apart, x 1e3: int8 turns it into noise."""

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        keep = attention_mask.unsqueeze(-1).to(x.dtype)
        garbage = (self.proj(x) - self.proj(x + 1e-3)) * 1e3
        return self.proj(x) * keep + garbage * (1 - keep)


def test_check_numerics_takes_an_output_mask():
    from fxcompress.testing import check_numerics

    batch = _padded()
    with pytest.raises(AssertionError, match="beyond 0.1"):
        check_numerics("quantize-int8-dynamic", PaddedGarbage().eval(), batch, tolerance=0.1, min_features=1)
    comparisons = check_numerics("quantize-int8-dynamic", PaddedGarbage().eval(), batch, tolerance=0.1,
                                 output_mask=None, min_features=1)
    assert comparisons[0].masked is not None and comparisons[0].masked.drift < 0.1 < comparisons[0].drift


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.norm, self.proj = nn.Embedding(1000, 64), nn.LayerNorm(64), nn.Linear(64, 64)

    def forward(self, input_ids):
        return self.proj(self.norm(self.embed(input_ids)))


def test_static_int8_stores_embedding_tables_as_int8_lookups():
    import onnx

    from fxcompress.passes.quantize_dynamic import int8_embedding

    ids = [torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = fxcompress.compile(TinyEncoder().eval(), ids[0], "int8", calibration=ids)
    assert sum(n.target is int8_embedding for n in result.graph_module.graph.nodes) == 1
    stats = next(r.stats for r in result.report.records if r.name == "quantize-int8" and r.modified)
    assert stats["int8_embeddings"] == 1
    model = result.export_proto()
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    tables = {i.name: i for i in model.graph.initializer}
    assert any(tables.get(g.input[0]) is not None and tables[g.input[0]].data_type == onnx.TensorProto.INT8 for g in gathers)
    kept = fxcompress.compile(TinyEncoder().eval(), ids[0], [fxcompress.passes.quantize.QuantizeInt8Pass(embeddings=False)],
                              calibration=ids, tolerance={"drift": 1.0})
    assert not any(n.target is int8_embedding for n in kept.graph_module.graph.nodes)
