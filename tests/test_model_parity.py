"""Issue 2's acceptance models: resnet18, mobilenet_v2 and a BERT encoder compile, export and match.

ResNet-18 and the BERT encoder run in CI; MobileNetV2 is slow-marked with the larger sweep.
"""

from __future__ import annotations

import pytest
import torch

import fxcompress
from tests.models import randomize_bn


def _torchvision(name: str):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, weights=None)
    return randomize_bn(model).eval(), (torch.randn(1, 3, 224, 224),)


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=1000)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 1000, (1, 32))
    return model, (ids,)


def _check(model, inputs, tmp_path):
    result = fxcompress.compile(model, inputs, recipe="default")
    assert result.report.nodes_after <= result.report.nodes_before
    path = result.export_onnx(tmp_path / "m.onnx")
    report = fxcompress.validate(path, model, inputs)
    assert report.passed, report.to_text()
    assert report.cosine > 0.99999
    latency = fxcompress.benchmark(path, inputs, warmup=2, runs=5)
    assert latency.provider == "cpu" and latency.p50_ms > 0


def test_resnet18(tmp_path):
    _check(*_torchvision("resnet18"), tmp_path)


def test_bert_encoder(tmp_path):
    _check(*_bert(), tmp_path)


@pytest.mark.slow
def test_mobilenet_v2(tmp_path):
    _check(*_torchvision("mobilenet_v2"), tmp_path)
