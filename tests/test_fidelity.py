"""Fidelity as users measure it: padded positions an attention mask excludes do not count (the
masked drift gates, the whole-output drift is reported beside it), the ``output_mask`` hook, and
per-output drift / relative RMS error / cosine in the compile report, parity and compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import DriftError, InputError
from fxcompress.numerics import compare_output, compare_outputs, worst_drift, worst_unmasked_drift
from fxcompress.runtime.parity import validate


class PaddedGarbage(nn.Module):
    """A keyword encoder whose padded positions carry garbage int8 cannot reproduce.

    Kept positions: a plain projection. Padded positions: the difference of the projection at two
    inputs 1e-3 apart, scaled by 1e3: exact in float (about -W.sum(1)), but dynamic int8
    quantizes both inputs to nearly the same codes, so the difference comes out as noise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        keep = attention_mask.unsqueeze(-1).to(x.dtype)
        garbage = (self.proj(x) - self.proj(x + 1e-3)) * 1e3
        hidden = self.proj(x) * keep + garbage * (1 - keep)
        pooled = (hidden * keep).sum(1) / keep.sum(1)
        return {"last_hidden_state": hidden, "pooled": pooled}


def _padded_batch(batch: int = 2, length: int = 6, vocab: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g), "attention_mask": mask}


@pytest.fixture(scope="module")
def garbage():
    torch.manual_seed(0)
    model, batch = PaddedGarbage().eval(), _padded_batch()
    return model, batch, fxcompress.compile(model, batch, "int8-dynamic")


def _reference(model, batch):
    with torch.no_grad():
        return model(**batch)


def test_padded_positions_do_not_gate_and_both_figures_are_reported(garbage, tmp_path):
    model, batch, result = garbage
    report = result.report
    assert report.masked
    # The garbage in the padded positions drifts far beyond int8-dynamic's bounds; the kept ones do not.
    assert report.unmasked_drift > 0.3 and report.gate.passes(report.outputs)
    rows = {o.name: o for o in report.outputs}
    assert set(rows) == {"last_hidden_state", "pooled"}
    hidden = rows["last_hidden_state"]
    assert hidden.masked_drift is not None and hidden.masked_drift < hidden.drift
    assert hidden.drift == pytest.approx(report.unmasked_drift)
    assert rows["pooled"].masked_drift is None  # [B, H]: compared whole
    # The per-pass drift in the table is the masked figure too (it names the culprit of a DriftError).
    quantize = [r for r in report.records if r.name == "quantize-int8-dynamic" and r.modified]
    assert quantize and quantize[-1].drift == pytest.approx(report.drift)
    text = report.to_text()
    assert "masked drift" in text and f"{report.unmasked_drift:.2e}" in text and f"{report.drift:.2e}" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["masked"] is True and data["unmasked_drift"] > data["drift"]
    assert [o["name"] for o in data["outputs"]] == ["last_hidden_state", "pooled"]
    # Export parity (ONNX vs compiled module) is masked the same way, figures side by side.
    result.export_onnx(tmp_path / "m.onnx")
    parity = result.report.parity
    assert parity.passed and parity.masked and parity.unmasked_drift >= parity.drift
    assert "over all positions" in parity.to_text()


def test_without_the_mask_the_padded_garbage_is_refused(garbage):
    model, batch, _ = garbage
    with pytest.raises(DriftError, match="relative RMS error"):
        fxcompress.compile(model, batch, "int8-dynamic", output_mask=False)


def test_compare_gates_on_the_masked_figure_and_reports_per_output(garbage):
    model, batch, result = garbage
    report = fxcompress.compare(result, model, runs=8)
    compiled = report.compiled.parity
    assert compiled.passed and compiled.masked and compiled.unmasked_drift > 0.3 > compiled.drift
    text = report.to_text()
    assert "Per output" in text and "last_hidden_state" in text and "rel RMS" in text
    data = json.loads(json.dumps(report.to_dict()))
    outputs = data["variants"][-1]["parity"]["outputs"]
    assert [o["name"] for o in outputs] == ["last_hidden_state", "pooled"]
    assert outputs[0]["masked_drift"] is not None and outputs[1]["masked_drift"] is None
    assert data["variants"][-1]["parity"]["unmasked_drift"] > data["variants"][-1]["parity"]["drift"]
    unmasked = fxcompress.compare(result, model, baseline=False, runs=8, output_mask=False).compiled.parity
    assert not unmasked.passed and not unmasked.masked


def test_bert_padded_batch_masked_figure_beside_unmasked():
    transformers = pytest.importorskip("transformers")
    from tests.test_inputs_transformers import _bert

    torch.manual_seed(0)
    model, batch = _bert()
    result = fxcompress.compile(model, batch, "int8-dynamic")
    report = result.report
    rows = {o.name: o for o in report.outputs}
    assert list(rows) == ["last_hidden_state", "pooler_output"]
    hidden = rows["last_hidden_state"]
    assert hidden.masked_drift is not None and rows["pooler_output"].masked_drift is None
    # The masked figure by hand: only the positions the attention mask keeps.
    reference = _reference(model, batch).last_hidden_state.double()
    with torch.no_grad():
        got = result.module(**batch).last_hidden_state.double()
    keep = batch["attention_mask"].bool()
    by_hand = float((got - reference)[keep].abs().max() / reference[keep].abs().max())
    whole = float((got - reference).abs().max() / reference.abs().max())
    assert hidden.masked_drift == pytest.approx(by_hand, rel=1e-6)
    # Relative to the kept positions' own scale, the masked figure may be a little above or below the whole one.
    assert hidden.drift == pytest.approx(whole, rel=1e-6)
    assert report.unmasked_drift == pytest.approx(max(o.drift for o in report.outputs))
    assert report.drift == pytest.approx(max(hidden.masked_drift, rows["pooler_output"].drift))
    assert "masked drift" in report.to_text()
    assert transformers is not None


def test_output_mask_callable_changes_the_gating_figure(garbage):
    model, batch, result = garbage
    same = fxcompress.compile(model, batch, "int8-dynamic", output_mask=lambda inputs, outputs: inputs["attention_mask"] != 0)
    assert same.report.drift == pytest.approx(result.report.drift)
    by_name = fxcompress.compile(model, batch, "int8-dynamic", output_mask="attention_mask")
    assert by_name.report.drift == pytest.approx(result.report.drift)
    # Counting every position of the hidden state through the hook refuses the garbage.
    every = lambda inputs, outputs: {"last_hidden_state": torch.ones(outputs["last_hidden_state"].shape[:2], dtype=torch.bool)}  # noqa: E731
    with pytest.raises(DriftError, match="over all positions"):
        fxcompress.compile(model, batch, "int8-dynamic", output_mask=every)
    # A per-output list, one mask kept to the first sequence only.
    first_only = lambda inputs, outputs: [torch.tensor([[True] * 6, [False] * 6]), None]  # noqa: E731
    narrow = fxcompress.compile(model, batch, "int8-dynamic", output_mask=first_only)
    assert narrow.output_mask is first_only
    assert narrow.report.outputs[0].masked_drift <= result.report.outputs[0].masked_drift
    # The result's hook governs export parity, and export_onnx may override it.
    with pytest.raises(fxcompress.errors.ExportError):
        fxcompress.compile(model, batch, "int8-dynamic").export_proto(output_mask=every)


def test_validate_takes_output_mask(garbage):
    model, batch, result = garbage
    proto = result.export_proto(validate=False)
    masked = validate(proto, model, batch, tolerance=result.tolerance)
    whole = validate(proto, model, batch, tolerance=result.tolerance, output_mask=False)
    assert masked.passed and masked.masked and not whole.passed and not whole.masked
    assert whole.drift == pytest.approx(masked.unmasked_drift)
    assert {"outputs", "unmasked_drift", "masked"} <= set(masked.to_dict())


def test_rel_rms_and_cosine_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 4, 3))
    got = ref + rng.normal(scale=0.1, size=ref.shape)
    got[1, 2:] += 50.0  # garbage in the masked-out positions
    mask = np.array([[True] * 4, [True, True, False, False]])
    c = compare_output(0, ref, got, mask, "hidden")
    kept_ref, kept_got = ref[mask].ravel(), got[mask].ravel()
    assert c.masked.rel_rms == pytest.approx(np.linalg.norm(kept_got - kept_ref) / np.linalg.norm(kept_ref))
    assert c.masked.cosine == pytest.approx(kept_ref @ kept_got / (np.linalg.norm(kept_ref) * np.linalg.norm(kept_got)))
    assert c.masked.drift == pytest.approx(np.abs(kept_got - kept_ref).max() / np.abs(kept_ref).max())
    assert c.rel_rms == pytest.approx(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert c.drift > 10 > c.masked.drift and c.judged is c.masked
    comparisons = compare_outputs([ref, ref[:, 0]], [got, got[:, 0]], [mask, None], ["hidden", "pooled"])
    assert worst_drift(comparisons) == pytest.approx(max(c.masked.drift, comparisons[1].drift))
    assert worst_unmasked_drift(comparisons) == pytest.approx(c.drift)


def test_one_record_per_output_worst_over_input_sets():
    """Reports list the same record a single comparison gives (OutputComparison), each figure the
    worst over the input sets, the masked figures worst over them as well."""
    from fxcompress.fidelity import output_fidelity

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2, 4, 3))
    mask = np.array([[True] * 4, [True, True, False, False]])
    small, large = ref + rng.normal(scale=0.01, size=ref.shape), ref + rng.normal(scale=0.2, size=ref.shape)
    runs = [[compare_output(0, ref, small, mask, "hidden")], [compare_output(0, ref, large, mask, "hidden")]]
    (row,) = output_fidelity(runs)
    assert type(row) is type(runs[0][0]) and row.name == "hidden" and row.shape == (2, 4, 3)
    for figure in ("drift", "rel_rms", "max_abs"):
        assert getattr(row, figure) == max(getattr(r[0], figure) for r in runs)
        assert getattr(row.masked, figure) == max(getattr(r[0].masked, figure) for r in runs)
    assert row.judged.cosine == min(r[0].masked.cosine for r in runs) and row.masked_drift == row.masked.drift
    data = json.loads(json.dumps(row.to_dict()))
    assert data["masked_drift"] == row.masked.drift and data["masked"]["rel_rms"] == row.masked.rel_rms
    assert str(row) == row.to_text() and "masked drift" in row.to_text()


def test_compile_report_rel_rms_and_cosine_match_a_hand_computation(garbage):
    model, batch, result = garbage
    reference = _reference(model, batch)
    with torch.no_grad():
        got = result.module(**batch)
    keep = batch["attention_mask"].bool()
    rows = {o.name: o for o in result.report.outputs}
    for name, mask in (("last_hidden_state", keep), ("pooled", None)):
        a, b = reference[name].double(), got[name].double()
        if mask is not None:
            a, b = a[mask], b[mask]
        a, b = a.ravel(), b.ravel()
        # judged: the masked figures where a mask applies (the record keeps the whole-output ones beside them)
        assert rows[name].judged.rel_rms == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-6)
        assert rows[name].judged.cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-9)


def _bad_masks():
    return [
        (3, "output_mask must be"),
        ("padding_mask", "names the input 'padding_mask'"),
        (lambda i, o: 1 / 0, "output_mask raised ZeroDivisionError"),
        (lambda i, o: i["attention_mask"], "int64 tensor"),
        (lambda i, o: {"last_hidden_state": torch.ones(3, 6, dtype=torch.bool)}, "leading dimensions"),
        (lambda i, o: torch.ones(7, dtype=torch.bool), "matches the leading dimensions of no output"),
        (lambda i, o: {"logits": None}, "not outputs of the model"),
        (lambda i, o: [None], "1 masks for the model's 2 outputs"),
        (lambda i, o: "all", "returned a str"),
    ]


@pytest.mark.parametrize("output_mask, fragment", _bad_masks(), ids=[f"bad{i}" for i in range(len(_bad_masks()))])
def test_bad_output_mask_is_one_paragraph_input_error(garbage, output_mask, fragment):
    model, batch, _ = garbage
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError) as info:
        fxcompress.compile(model, batch, "int8-dynamic", output_mask=output_mask)
    message = str(info.value)
    assert fragment in message and "Fix:" in message and "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_output_mask_at_export_writes_nothing(garbage, tmp_path):
    model, batch, result = garbage
    path = tmp_path / "m.onnx"
    with pytest.raises(InputError, match="output_mask raised"):
        result.export_onnx(path, output_mask=lambda i, o: i["missing"])
    assert not path.exists()
    with pytest.raises(InputError, match="output_mask must be"):
        fxcompress.compare(result, model, output_mask=1.5)
