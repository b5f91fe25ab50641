"""A small transformer encoder trained on scikit-learn's bundled digits, seen as padded token sequences.

Each 8x8 image is cut into sixteen 2x2 patches; blank patches (all zero) are dropped, so every
image is a sequence of 6 to 16 tokens, and a batch is padded to 16 with an attention mask (1 for a
real token, 0 for padding), as a tokenizer pads text. A token is its 4 pixel values and a one-hot
of the patch's place in the image (20 features).

The encoder is pre-LN (LayerNorm before attention and before the GELU MLP, residual adds around
both), masked mean pooling of the last states gives a sentence-style embedding, and a linear
classifier reads it. ``forward(tokens, attention_mask)`` returns ``(logits, embedding)``: a task
score and the vector users compare with cosine similarity. It trains in seconds on 2 CPU cores
and is the trained-transformer case of the int8 tests and ``benchmarks/trained_encoder.py``
(activation statistics of a trained network, unlike random weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fxcompress.examples.digits import DigitsData, load_digits_data, padded_batches, run_epochs

#: Patches per image (2x2 patches of an 8x8 image) and features per token (4 pixels + place one-hot).
MAX_TOKENS = 16
TOKEN_FEATURES = 4 + MAX_TOKENS


def to_sequences(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 1, 8, 8]`` images as padded token sequences ``[N, 16, 20]`` and a float mask ``[N, 16]``.

    Blank patches are dropped and the kept ones packed to the front in reading order, so the
    sequence length varies per image; padded positions hold zeros and mask 0.
    """
    n = images.shape[0]
    patches = images.reshape(n, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n, MAX_TOKENS, 4)
    place = torch.eye(MAX_TOKENS).expand(n, MAX_TOKENS, MAX_TOKENS)
    tokens = torch.cat([patches, place], dim=-1)
    keep = patches.abs().sum(-1) > 0
    # A stable sort of "dropped" flags packs the kept patches first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    tokens = torch.gather(tokens, 1, order.unsqueeze(-1).expand(-1, -1, TOKEN_FEATURES))
    mask = torch.gather(keep, 1, order).to(torch.float32)
    return tokens * mask.unsqueeze(-1), mask


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: masked multi-head self-attention, then a GELU MLP, each residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads)) + bias
        attended = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsEncoder(nn.Module):
    """Token projection, ``depth`` pre-LN blocks, final LayerNorm, masked mean pooling, embedding, classifier."""

    def __init__(self, width: int = 64, depth: int = 3, heads: int = 4, embedding: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(TOKEN_FEATURES, width)
        self.blocks = nn.ModuleList(EncoderBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, embedding)
        self.classifier = nn.Linear(embedding, 10)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Additive mask: -1e4 (not -inf) so a fully masked row stays finite in every runtime.
        bias = ((attention_mask - 1.0) * 1e4)[:, None, None, :]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, bias)
        x = self.norm(x)
        weights = attention_mask.unsqueeze(-1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        embedding = self.head(pooled)
        return self.classifier(embedding), embedding


@dataclass
class DigitsSequences:
    """Train/test token sequences, masks and labels."""

    tokens_train: torch.Tensor
    mask_train: torch.Tensor
    y_train: torch.Tensor
    tokens_test: torch.Tensor
    mask_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_sequences(seed: int = 0) -> DigitsSequences:
    """The digits split of :func:`load_digits_data`, as padded token sequences."""
    data: DigitsData = load_digits_data(seed)
    tokens_train, mask_train = to_sequences(data.x_train)
    tokens_test, mask_test = to_sequences(data.x_test)
    return DigitsSequences(tokens_train, mask_train, data.y_train, tokens_test, mask_test, data.y_test)


def train_encoder(model: DigitsEncoder, data: DigitsSequences, epochs: int = 20, lr: float = 2e-3,
                  seed: int = 0, batch_size: int = 64) -> DigitsEncoder:
    """AdamW with a cosine decay; deterministic for a given seed (a few seconds on 2 cores)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(data.tokens_train) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    return run_epochs(model, (data.tokens_train, data.mask_train), data.y_train,
                      lambda outputs, labels: F.cross_entropy(outputs[0], labels), optimizer, scheduler, epochs, batch_size)


def encoder_accuracy(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of a (compiled or original) encoder in PyTorch."""
    with torch.no_grad():
        return float((model(tokens, mask)[0].argmax(1) == y).float().mean())


def onnx_encoder_outputs(path, tokens: torch.Tensor, mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embeddings) of an exported encoder run in ORT (CPU), ``batch`` sequences at a time.

    The file's batch size may be fixed: the last partial batch is padded with copies and trimmed.
    """
    from fxcompress.runtime.session import create_session

    session = create_session(path, "cpu")
    logits, embeddings = [], []
    for (t, m), real in padded_batches((tokens, mask), batch):
        out = session.run((t.numpy(), m.numpy()))
        logits.append(torch.from_numpy(out[0][:real]))
        embeddings.append(torch.from_numpy(out[1][:real]))
    return torch.cat(logits), torch.cat(embeddings)




def with_channel_outliers(model: DigitsEncoder, channels: tuple[int, ...] = (3, 17), factor: float = 30.0) -> DigitsEncoder:
    """The same function with a few LayerNorm output channels ``factor`` times larger (in place; returns ``model``).

    Large trained transformers concentrate their LayerNorm outputs in a few channels (a large
    ``gamma`` there); a tiny encoder trained for seconds does not (its per-channel ranges differ by
    under 2x). This reproduces that shape exactly: each block's LayerNorm ``gamma``/``beta`` are
    multiplied by ``factor`` on ``channels`` and the reading linear layer's weight columns divided
    by it, so outputs are unchanged in fp32 while a per-tensor int8 scale sees the outliers.
    """
    scale = torch.ones(model.norm.normalized_shape[0])
    scale[list(channels)] = factor
    with torch.no_grad():
        for block in model.blocks:
            for norm, linear in ((block.norm1, block.qkv), (block.norm2, block.fc1)):
                norm.weight.mul_(scale)
                norm.bias.mul_(scale)
                linear.weight.div_(scale)
    return model


__all__ = ["DigitsEncoder", "DigitsSequences", "EncoderBlock", "encoder_accuracy", "load_digits_sequences",
           "onnx_encoder_outputs", "to_sequences", "train_encoder", "with_channel_outliers"]
