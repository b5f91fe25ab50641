"""Sweep: Hugging Face architectures called the way their users call them (keyword tensors:
``input_ids``/``attention_mask``, ``pixel_values``, ``input_features``, ``input_values``), tiny
random-init configs, through the `default` preset. Slow; tests/test_inputs_transformers.py is the
CI subset (BERT, DistilBERT, ViT through default and int8-dynamic, exported)."""

from __future__ import annotations

import pytest
import torch

import fxcompress

transformers = pytest.importorskip("transformers")
T = transformers
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _text(vocab: int = 100, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    return {"input_ids": torch.randint(0, vocab, (2, length), generator=g), "attention_mask": mask}


def _pixels(size: int = 32, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}


CASES = {
    "roberta": lambda: (T.RobertaModel(T.RobertaConfig(vocab_size=100, **SMALL)), _text()),
    "albert": lambda: (T.AlbertModel(T.AlbertConfig(vocab_size=100, embedding_size=16, **SMALL)), _text()),
    "electra": lambda: (T.ElectraModel(T.ElectraConfig(vocab_size=100, embedding_size=16, **SMALL)), _text()),
    "xlm-roberta": lambda: (T.XLMRobertaModel(T.XLMRobertaConfig(vocab_size=100, **SMALL)), _text()),
    "deberta-v2": lambda: (T.DebertaV2Model(T.DebertaV2Config(vocab_size=100, **SMALL)), _text()),
    "mpnet": lambda: (T.MPNetModel(T.MPNetConfig(vocab_size=100, **SMALL)), _text()),
    "bert-classifier": lambda: (T.BertForSequenceClassification(T.BertConfig(vocab_size=100, **SMALL)), _text()),
    "swin": lambda: (T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                              num_heads=[1, 2], window_size=4)), _pixels()),
    "segformer": lambda: (T.SegformerModel(T.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])), _pixels()),
    "convnext": lambda: (T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)), _pixels()),
    "whisper-encoder": lambda: (T.WhisperModel(T.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, vocab_size=100,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).get_encoder(),
        {"input_features": torch.randn(2, 16, 32)}),
    "wav2vec2": lambda: (T.Wav2Vec2Model(T.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)),
        {"input_values": torch.randn(2, 800)}),
    "detr": lambda: (T.DetrModel(T.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], out_features=["stage2"]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10)), _pixels(64, 1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_keyword_called_architecture_compiles_losslessly(name):
    torch.manual_seed(0)
    model, batch = CASES[name]()
    model.eval()
    result = fxcompress.compile(model, batch, "default")
    assert result.report.drift <= 1e-4
    out, reference = result.module(**batch), model(**batch)
    assert type(out) is type(reference)
