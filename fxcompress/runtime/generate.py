"""Token generation in ONNX Runtime over a decoder exported by ``fxcompress.compile_decoder``.

One graph serves prefill (the prompt, an empty past) and every decode step (one token, the
cache so far), unless the export paired it with a prefill graph compiled differently (its spec's
``prefill_graph``, a file beside it): then that graph runs the prompt and hands its cache to the
decode graph, which has the same inputs and outputs. The cache never leaves ONNX Runtime: each step binds the ``present.*`` outputs
ORT allocated (OrtValues, on the session's device) as the next step's ``past_key_values.*``
inputs through IO binding, so only the last position's logits are copied out per step.

Greedy decoding matches transformers' ``generate`` token for token on the same weights;
sampling (temperature, top-k, top-p) draws from a NumPy generator seeded by ``seed``, so a
seed reproduces its tokens (they are not transformers' draws, which use torch's RNG).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from fxcompress.capture_decoder import DECODER_METADATA, SUPPORTED_GENERATION, DecoderSpec, step_inputs
from fxcompress.errors import InputError
from fxcompress.export.onnx_export import load_onnx
from fxcompress.runtime.session import RuntimeSession, create_session, to_numpy


@dataclass
class DecoderSession:
    """An ORT session over an exported decoder and the :class:`DecoderSpec` read from its metadata;
    ``prefill``: the session of its paired prefill graph, if it has one (else ``runtime`` runs the prompt too)."""

    runtime: RuntimeSession
    spec: DecoderSpec
    prefill: RuntimeSession | None = None

    @property
    def prompt_runtime(self) -> RuntimeSession:
        """The session that runs a prompt (empty past)."""
        return self.prefill if self.prefill is not None else self.runtime

    @property
    def device(self) -> str:
        return "cuda" if self.runtime.provider == "cuda" else "cpu"


def decoder_session(model: str | os.PathLike | bytes | onnx.ModelProto | DecoderSession, provider: str = "cpu",
                    *, optimize: bool = True, prefill: str | os.PathLike | bytes | onnx.ModelProto | None = None
                    ) -> DecoderSession:
    """Open an exported decoder (path, bytes or ModelProto) for :func:`generate`; a
    DecoderSession is returned as it is.

    A file exported with a paired prefill graph opens that graph too (the file its metadata
    names, beside it); ``prefill`` gives it explicitly (needed for bytes or a ModelProto).

    Raises InputError when the model carries no decoder metadata (it was not exported by
    ``compile_decoder``), naming what is supported, or when its prefill graph is missing.
    """
    if isinstance(model, DecoderSession):
        return model
    folder = None
    if isinstance(model, (str, os.PathLike)):
        folder = os.path.dirname(os.fspath(model))
        model = load_onnx(model)
    proto = _decoder_proto(model)
    spec = _decoder_spec(proto)
    if prefill is None and spec.prefill_graph is not None:
        prefill = os.path.join(folder, spec.prefill_graph) if folder is not None else None
        if prefill is None or not os.path.exists(prefill):
            raise InputError(
                f"This decoder was exported with a separate prefill graph ({spec.prefill_graph!r}), which "
                + ("was not found beside it." if prefill is not None else "cannot be located from bytes or a ModelProto."),
                "keep the two files of the export together and open the decoder by its path, or pass "
                "decoder_session(model, prefill=...).",
            )
    prompt = None
    if prefill is not None:
        if isinstance(prefill, (str, os.PathLike)):
            prefill = load_onnx(prefill)
        prompt_proto = _decoder_proto(prefill)
        if _decoder_spec(prompt_proto).kv_shapes != spec.kv_shapes:
            raise InputError("the prefill graph's cache geometry differs from the decoder's: they come from different models.",
                             "pass the prefill graph exported with this decoder.")
        # The prompt graph runs once per generation: threads left spinning after it would take the
        # cores from the decode steps that follow (benchmarks/decoder_ablations.py: 0.209 -> 0.156 s
        # for a 128-token prompt and 32 new tokens, 6 x 768 Llama, 2 cores).
        prompt = create_session(prompt_proto, provider, optimize=optimize, spin=False)
    return DecoderSession(create_session(proto, provider, optimize=optimize), spec, prompt)


def _decoder_proto(model: bytes | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)


def _decoder_spec(proto: onnx.ModelProto) -> DecoderSpec:
    text = next((p.value for p in proto.metadata_props if p.key == DECODER_METADATA), None)
    if text is None:
        raise InputError(
            "This ONNX model carries no decoder description (metadata 'fxcompress_decoder'), so it cannot be generated "
            "from: generate() serves causal LMs exported by fxcompress.compile_decoder (KV cache as "
            "past_key_values.*/present.* inputs and outputs).",
            "compile the model with fxcompress.compile_decoder(model) and export that result.",
        )
    return DecoderSpec.from_json(text)


def _check_options(max_new_tokens: Any, temperature: float, top_k: Any, top_p: float, num_beams: Any) -> None:
    if num_beams != 1:
        raise InputError(f"num_beams={num_beams!r}: beam search is not supported; generate() does {SUPPORTED_GENERATION}.",
                         "use num_beams=1 (greedy or sampling), or generate with transformers.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.", "e.g. max_new_tokens=64.")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature!r}.",
                         "use do_sample=False for greedy decoding, or a temperature such as 0.7.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise InputError(f"top_k must be a whole number >= 0 (0: off), got {top_k!r}.", "e.g. top_k=50.")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}.", "e.g. top_p=0.9 (1.0: off).")


def _prompt(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(to_numpy(input_ids))
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] == 0:
        raise InputError(f"input_ids must be a non-empty [batch, length] integer tensor, got {ids.dtype} {list(ids.shape)}.",
                         "pass token ids as a LongTensor, e.g. tokenizer(text, return_tensors='pt').input_ids.")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise InputError(f"input_ids hold ids outside the vocabulary [0, {vocab_size}).",
                         "tokenize with the model's own tokenizer.")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(to_numpy(attention_mask)).long()
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)} but input_ids {list(ids.shape)}.",
                         "pass the mask the tokenizer returned with the ids (left padding for batches).")
    return ids.long(), mask


def next_token_scores(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float) -> np.ndarray:
    """Sampling probabilities ``[batch, vocab]`` from last-position logits, as transformers
    filters them: temperature, then top-k, then top-p (the most probable token always stays)."""
    scores = logits.astype(np.float64) / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        kth = np.sort(scores, axis=-1)[:, -k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probabilities = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probabilities, axis=-1)
        ranked = np.take_along_axis(probabilities, order, axis=-1)
        # keep a token while the mass before it is below top_p
        keep_ranked = (np.cumsum(ranked, axis=-1) - ranked) < top_p
        keep = np.zeros_like(keep_ranked)
        np.put_along_axis(keep, order, keep_ranked, axis=-1)
        probabilities = np.where(keep, probabilities, 0.0)
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
    return probabilities


class _CacheLoop:
    """The IO-bound prefill/decode steps of one generation."""

    def __init__(self, decoder: DecoderSession) -> None:
        self.decoder = decoder
        self.present: list[Any] | None = None
        self.bindings: dict[int, Any] = {}  # one IO binding per session, reused every step

    def step(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Run ``ids`` after the cache so far; return the last position's logits ``[batch, vocab]``."""
        spec = self.decoder.spec
        # The prompt runs on the prefill graph where the export paired one; decode steps on the decoder.
        session = (self.decoder.prompt_runtime if self.present is None else self.decoder.runtime).session
        binding = self.bindings.get(id(session))
        if binding is None:
            binding = self.bindings[id(session)] = session.io_binding()
        head = step_inputs(spec, ids, None, mask)[:3]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in zip(spec.input_names[:3], head):
            binding.bind_cpu_input(name, np.ascontiguousarray(value.numpy()))
        if self.present is None:
            for name, value in zip(spec.past_names, step_inputs(spec, ids)[3:]):
                binding.bind_cpu_input(name, to_numpy(value))  # a bf16 model's empty cache: float32, as its file takes
        else:
            for name, value in zip(spec.past_names, self.present):
                binding.bind_ortvalue_input(name, value)
        for name in spec.output_names:
            binding.bind_output(name, self.decoder.device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.present = list(outputs[1:])
        return outputs[0].numpy()[:, -1, :]


def generate(
    model: str | os.PathLike | bytes | onnx.ModelProto | DecoderSession,
    input_ids: Any,
    *,
    attention_mask: Any = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = ...,  # type: ignore[assignment]
    pad_token_id: int | None = None,
    num_beams: int = 1,
    provider: str = "cpu",
) -> torch.Tensor:
    """Generate tokens with an exported decoder in ONNX Runtime; returns ``[batch, prompt + new]`` ids.

    Args:
        model: the exported decoder (path, bytes, ModelProto) or a :class:`DecoderSession`.
        input_ids: ``[batch, length]`` (or ``[length]``) prompt token ids; batches left-padded,
            with ``attention_mask`` marking the padding, as for transformers' generate.
        max_new_tokens: tokens to add (default: the model's generation config, as transformers).
        do_sample, temperature, top_k, top_p: decoding; None takes the model's generation config.
        seed: seeds the sampler (None: a fresh one); greedy decoding ignores it.
        eos_token_id: stop a row at these ids (default: the model's); None: never stop early.
            Rows that stopped are filled with ``pad_token_id`` (default: the model's, else the
            first end-of-sequence id, as transformers does).
        num_beams: only 1; beam search raises InputError.
        provider: "cpu" or "cuda" (for a path, bytes or ModelProto).
    """
    decoder = decoder_session(model, provider)
    spec = decoder.spec
    ids, mask = _prompt(input_ids, attention_mask, spec.vocab_size)
    if max_new_tokens is None:
        max_new_tokens = spec.max_new_tokens if spec.max_new_tokens is not None else max(1, spec.max_length - ids.shape[1])
    do_sample = spec.do_sample if do_sample is None else do_sample
    temperature = spec.temperature if temperature is None else temperature
    top_k = spec.top_k if top_k is None else top_k
    top_p = spec.top_p if top_p is None else top_p
    _check_options(max_new_tokens, temperature, top_k, top_p, num_beams)
    eos = spec.eos_token_ids if eos_token_id is ... else (
        () if eos_token_id is None else tuple(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]))
    pad = pad_token_id if pad_token_id is not None else spec.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    rng = np.random.default_rng(seed)
    loop = _CacheLoop(decoder)
    tokens, unfinished = ids, np.ones(ids.shape[0], dtype=bool)
    logits = loop.step(ids, mask)
    for step in range(max_new_tokens):
        if do_sample:
            probabilities = next_token_scores(logits, temperature, top_k, top_p)
            chosen = np.array([rng.choice(p.shape[0], p=p) for p in probabilities])
        else:
            chosen = logits.argmax(axis=-1)
        chosen = np.where(unfinished, chosen, pad)
        new = torch.from_numpy(chosen.astype(np.int64))[:, None]
        tokens = torch.cat([tokens, new], dim=1)
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        if eos:
            unfinished &= ~np.isin(chosen, eos)
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        logits = loop.step(new, mask)
    return tokens


def sequence_logits(model: str | os.PathLike | bytes | onnx.ModelProto | DecoderSession, input_ids: Any,
                    provider: str = "cpu") -> np.ndarray:
    """Logits ``[batch, length, vocab]`` of every position of ``input_ids`` in one prefill run
    (what perplexity is computed from; on the prefill graph where the export paired one)."""
    decoder = decoder_session(model, provider)
    ids, _ = _prompt(input_ids, None, decoder.spec.vocab_size)
    return decoder.prompt_runtime.session.run(["logits"], {name: to_numpy(value) for name, value in
                                                    zip(decoder.spec.input_names, step_inputs(decoder.spec, ids))})[0]
