"""A small causal LM with real weights: a character-level Llama trained at run time.

The text is Python's own documentation, the ``pydoc_data.topics`` module that ships with
CPython itself (about 465k characters of English prose and code), so nothing is downloaded and
every machine that runs fxcompress has it. Characters map one-to-one to tokens (newline and
printable ASCII; anything else becomes ``?``). The last tenth of the text is held out: the
perplexity on it after int8 / int4 compression tells whether the model still predicts text.

    model, data = train_tiny_lm(TEST)               # seconds: for tests
    model, data = train_tiny_lm(BENCHMARK)          # a few minutes: for benchmarks
    perplexity(model, data.valid)                   # PyTorch
    perplexity("lm.onnx", data.valid)               # the exported graph in ONNX Runtime
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from fxcompress.capture_decoder import DecoderSpec, step_inputs
from fxcompress.runtime.generate import DecoderSession, decoder_session, sequence_logits

#: newline, then the printable ASCII characters; index = token id
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}
_UNKNOWN = _INDEX["?"]


def corpus() -> str:
    """Python's documentation topics (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text`` (1-D LongTensor)."""
    return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text], dtype=torch.long)


def decode(ids: Any) -> str:
    """The text of token ids (a tensor or a list)."""
    return "".join(ALPHABET[int(i)] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))


@dataclass(frozen=True)
class TinyLMConfig:
    """Model size and training budget."""

    hidden: int
    layers: int
    heads: int
    context: int
    batch: int
    steps: int
    #: a safety bound only: training normally runs all ``steps`` (deterministic for a seed); on a
    #: machine so slow that it takes longer than this, it stops early
    seconds: float
    lr: float = 3e-3
    seed: int = 0


#: Seconds of training: a model clearly better than chance (tests).
TEST = TinyLMConfig(hidden=64, layers=2, heads=4, context=64, batch=8, steps=120, seconds=300.0)
#: A few minutes of training: perplexity that compression can visibly hurt (benchmarks).
BENCHMARK = TinyLMConfig(hidden=192, layers=3, heads=4, context=128, batch=16, steps=400, seconds=900.0, lr=2e-3)


@dataclass
class TextData:
    """The encoded corpus split into training and held-out token ids (1-D)."""

    train: torch.Tensor
    valid: torch.Tensor


def text_data(held_out: float = 0.1) -> TextData:
    """The corpus as token ids, the last ``held_out`` fraction kept for evaluation."""
    ids = encode(corpus())
    cut = int(len(ids) * (1 - held_out))
    return TextData(ids[:cut], ids[cut:])


def build_model(config: TinyLMConfig) -> nn.Module:
    """A randomly initialised Llama of ``config``'s size over :data:`ALPHABET` (no special tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama = LlamaConfig(vocab_size=len(ALPHABET), hidden_size=config.hidden, intermediate_size=config.hidden * 3,
                        num_hidden_layers=config.layers, num_attention_heads=config.heads,
                        num_key_value_heads=config.heads // 2 if config.heads % 2 == 0 else config.heads,
                        max_position_embeddings=max(512, 4 * config.context), bos_token_id=None, eos_token_id=None,
                        pad_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(llama)


def train_tiny_lm(config: TinyLMConfig = TEST, data: TextData | None = None) -> tuple[nn.Module, TextData]:
    """Train :func:`build_model` on the corpus for ``config.steps`` steps (or ``config.seconds``);
    returns the model in eval mode and the data. Deterministic for a seed, up to the time bound."""
    data = data or text_data()
    model = build_model(config).train()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    warmup = max(1, config.steps // 10)  # linear warm-up, then cosine decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    start = time.perf_counter()
    model.trained_steps = 0  # what ran: all ``steps`` unless the time bound cut training short
    for _ in range(config.steps):
        starts = torch.randint(0, len(data.train) - config.context - 1, (config.batch,), generator=generator)
        window = torch.stack([data.train[s:s + config.context + 1] for s in starts.tolist()])
        logits = model(input_ids=window[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        model.trained_steps += 1
        if time.perf_counter() - start > config.seconds:
            break
    return model.eval(), data


def perplexity(model: Any, ids: torch.Tensor, *, context: int = 128, windows: int | None = 64,
               spec: DecoderSpec | None = None) -> float:
    """exp(mean next-token loss) over consecutive windows of ``context`` tokens of ``ids``.

    ``model`` is a transformers causal LM, a compiled decoder module (``result.module``, with
    ``spec=result.spec``), or an exported decoder (a path, ModelProto or DecoderSession, run in
    ONNX Runtime). ``windows`` bounds the work (None: all of ``ids``).
    """
    count = (len(ids) - 1) // context
    count = count if windows is None else min(count, windows)
    inputs = ids[: count * context].view(count, context)
    targets = ids[1: count * context + 1].view(count, context)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        model = decoder_session(model)  # one ORT session for every window
    losses = []
    for row in range(0, count, 8):
        batch = inputs[row:row + 8]
        if isinstance(model, DecoderSession):
            logits = torch.from_numpy(np.asarray(sequence_logits(model, batch)))
        elif spec is not None:
            with torch.no_grad():
                logits = model(*step_inputs(spec, batch))[0]
        else:
            with torch.no_grad():
                logits = model(input_ids=batch).logits
        losses.append(nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[row:row + 8].flatten(),
                                                  reduction="sum"))
    return math.exp(float(sum(losses)) / (count * context))


__all__ = ["ALPHABET", "BENCHMARK", "TEST", "TextData", "TinyLMConfig", "build_model", "corpus", "decode", "encode",
           "perplexity", "text_data", "train_tiny_lm"]
