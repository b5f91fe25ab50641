"""End to end on a trained transformer: the digits encoder (padded token sequences + attention mask),
int8 and int8-dynamic through ONNX Runtime against fp32: accuracy within half a point, embedding cosine."""

from __future__ import annotations

import copy
from collections import Counter

import onnx
import pytest
import torch

import fxcompress
from fxcompress.examples.digits_encoder import (
    encoder_accuracy, load_digits_sequences, onnx_encoder_outputs, to_sequences, with_channel_outliers,
)
from fxcompress.passes.presets import int8
from fxcompress.runtime.session import create_session
from tests.digits_trained import trained as trained_model

BATCH = 16


@pytest.fixture(scope="module")
def trained():
    # The session's trained encoder (width 64, depth 2, 15 epochs, seed 0), shared with test_digits_int8/prune.
    model = trained_model("digits-encoder").model
    return model, load_digits_sequences()


def _example(data):
    return (data.tokens_train[:BATCH], data.mask_train[:BATCH])


def _calibration(data):
    return [(data.tokens_train[i:i + BATCH], data.mask_train[i:i + BATCH]) for i in range(0, 256, BATCH)]


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_sequences_are_variable_length_and_padded():
    pytest.importorskip("sklearn")
    images = torch.zeros(2, 1, 8, 8)
    images[0, 0, 0, 0] = 1.0  # one non-blank patch
    images[1] = 1.0  # all sixteen
    tokens, mask = to_sequences(images)
    assert mask.sum(1).tolist() == [1.0, 16.0]
    assert tokens[0, 1:].abs().sum() == 0 and tokens[0, 0, 4] == 1.0  # padded with zeros; place one-hot kept
    data = load_digits_sequences()
    lengths = data.mask_train.sum(1)
    assert lengths.min() < lengths.max() == 16


def test_int8_and_int8_dynamic_keep_accuracy_and_embeddings_through_onnx_runtime(trained, tmp_path):
    model, data = trained
    example, calibration = _example(data), _calibration(data)
    fp32 = fxcompress.compile(model, example, []).export_onnx(tmp_path / "fp32.onnx")
    ref_logits, ref_embedding = onnx_encoder_outputs(fp32, data.tokens_test, data.mask_test, BATCH)
    fp32_acc = float((ref_logits.argmax(1) == data.y_test).float().mean())
    assert fp32_acc > 0.9, "the test model did not train"
    floors = {"int8": 0.98, "int8-dynamic": 0.99}
    for preset, floor in floors.items():
        result = fxcompress.compile(model, example, preset, calibration=calibration)
        path = result.export_onnx(tmp_path / f"{preset}.onnx")
        logits, embedding = onnx_encoder_outputs(path, data.tokens_test, data.mask_test, BATCH)
        acc = float((logits.argmax(1) == data.y_test).float().mean())
        cos = _cosine(embedding, ref_embedding)
        print(f"{preset}: accuracy fp32 {fp32_acc:.4f} -> {acc:.4f}, embedding cosine min {cos.min():.4f} mean {cos.mean():.4f}")
        assert fp32_acc - acc <= 0.005, (preset, fp32_acc, acc)
        assert float(cos.min()) >= floor, (preset, float(cos.min()))


def test_int8_runs_ort_int8_kernels_and_leaves_layernorm_residuals_in_float(trained, tmp_path):
    model, data = trained
    result = fxcompress.compile(model, _example(data), "int8", calibration=_calibration(data))
    smooth = next(r for r in result.report.records if r.name == "smooth-activations")
    assert len(smooth.stats["smoothed"]) == 4  # norm1 and norm2 of both blocks (the final norm feeds pooling)
    path = result.export_onnx(tmp_path / "int8.onnx")
    create_session(path, "cpu", optimized_model_path=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    linears = 1 + 4 * 2 + 2  # embed, 4 per block, head, classifier
    assert ops["QGemm"] == linears, ops
    # attention: softmax @ v in int8; q @ k^T reads int8 and writes float for the softmax
    assert ops["QLinearMatMul"] == 2 and ops["MatMulIntegerToFloat"] == 2, ops
    assert ops["QLinearAdd"] == 0 and not {"Gemm", "FusedGemm"} & set(ops), ops
    assert ops["LayerNormalization"] + ops["SkipLayerNormalization"] == 5


def test_smoothing_rescues_static_int8_when_layernorm_outputs_have_outlier_channels(trained):
    model, data = trained
    outliers = with_channel_outliers(copy.deepcopy(model))
    test = (data.tokens_test[:64], data.mask_test[:64])
    with torch.no_grad():
        reference = model(*test)[1]
        assert torch.allclose(outliers(*test)[1], reference, atol=1e-4)  # same function in fp32
    no_smoothing = int8()
    no_smoothing.steps = [s for s in no_smoothing.steps if getattr(s, "name", None) != "smooth-activations"]
    cosines = {}
    for label, recipe in (("int8", "int8"), ("without smoothing", no_smoothing)):
        result = fxcompress.compile(outliers, _example(data), recipe, calibration=_calibration(data), tolerance=1.0)
        with torch.no_grad():
            out = torch.cat([result.module(*(t[i:i + BATCH] for t in test))[1] for i in range(0, 64, BATCH)])
        cosines[label] = float(_cosine(out, reference).min())
    print(f"outlier channels: embedding cosine min {cosines}")
    assert cosines["int8"] >= 0.98 and cosines["without smoothing"] < cosines["int8"] - 0.01, cosines
    assert encoder_accuracy(outliers, *test, data.y_test[:64]) == encoder_accuracy(model, *test, data.y_test[:64])
