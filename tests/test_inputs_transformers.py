"""Hugging Face models called the way their users call them: ``model(**batch)`` with a
BatchEncoding (tiny random-init configs, no downloads), through default and int8-dynamic, export
and parity; ONNX inputs named after the keywords and outputs after the model's fields."""

from __future__ import annotations

import onnx
import pytest
import torch

import fxcompress

transformers = pytest.importorskip("transformers")


def _text_batch(vocab: int = 100, length: int = 8) -> "transformers.BatchEncoding":
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 3:] = 0  # a padded sequence, as a tokenizer makes for a batch
    return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})


def _bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)
    return transformers.BertModel(config).eval(), _text_batch()


def _distilbert():
    config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100)
    return transformers.DistilBertModel(config).eval(), _text_batch()


def _vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    return transformers.ViTModel(config).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


@pytest.mark.parametrize("build", [_bert, _distilbert, _vit], ids=["bert", "distilbert", "vit"])
@pytest.mark.parametrize("recipe", ["default", "int8-dynamic"])
def test_keyword_called_transformers_compile_and_export(build, recipe, tmp_path):
    torch.manual_seed(0)
    model, batch = build()
    result = fxcompress.compile(model, batch, recipe)
    out = result.module(**batch)
    reference = model(**batch)
    assert type(out) is type(reference)  # the model's own output class, fields intact
    drift = (out.last_hidden_state - reference.last_hidden_state).abs().max() / reference.last_hidden_state.abs().max()
    assert drift <= result.tolerance
    proto = onnx.load(str(result.export_onnx(tmp_path / "m.onnx")))
    assert [i.name for i in proto.graph.input] == list(batch.keys())
    assert proto.graph.output[0].name == "last_hidden_state"
    assert result.report.parity.passed
