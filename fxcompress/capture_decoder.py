"""Decoder-only language models with a KV cache, as one flat-tensor graph for prefill and decode.

A Hugging Face causal LM takes and returns its KV cache as a ``DynamicCache`` object, which
torch.export refuses as an output ("Found DynamicCache in output, which is not a known type").
:class:`DecoderModule` wraps the model so that the cache is plain tensors: it takes
``(input_ids, attention_mask, position_ids, past_key_0, past_value_0, ...)``, builds the
``DynamicCache`` inside forward() and returns ``(logits, present_key_0, present_value_0, ...)``.
Captured with symbolic batch, sequence and past lengths it is one ordinary ATen graph that every
pass works on, and one ONNX file that serves both prefill (past length 0) and decode steps (one
new token) — ONNX Runtime accepts the empty past tensors of prefill.

Graph inputs and outputs follow the ONNX Runtime GenAI / optimum names: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key`` / ``.value`` ->
``logits``, ``present.{i}.key`` / ``.value``. :class:`DecoderSpec` (cache geometry, vocabulary,
generation defaults) travels in the ONNX metadata so that a file alone can be generated from.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fxcompress.errors import InputError

#: ONNX metadata key under which the exported file carries its :class:`DecoderSpec` (JSON).
DECODER_METADATA = "fxcompress_decoder"

SUPPORTED_MODELS = "a Hugging Face decoder-only causal LM (Llama, Qwen2, Mistral, GPT-2, Phi and alike)"
SUPPORTED_CACHE = ("transformers' dynamic KV cache (DynamicCache: generation_config.cache_implementation unset or "
                   "'dynamic'), one key and one value tensor [batch, kv_heads, length, head_dim] per layer")
SUPPORTED_GENERATION = ("greedy decoding (do_sample=False, num_beams=1) and sampling (do_sample=True) with "
                        "temperature, top_k and top_p")

#: Generation-config fields the ONNX generate loop does not implement, with their neutral value.
_UNSERVED_GENERATION = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None,
    "constraints": None, "typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "diversity_penalty": 0.0, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "guidance_scale": None, "watermarking_config": None,
    "min_length": 0, "min_new_tokens": 0, "stop_strings": None, "dola_layers": None, "prompt_lookup_num_tokens": None,
    "exponential_decay_length_penalty": None,
}


def past_name(layer: int, kind: str) -> str:
    """``past_key_values.{layer}.{kind}``: the graph input holding a layer's cached keys or values."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """``present.{layer}.{kind}``: the graph output holding a layer's keys or values after this step."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class DecoderSpec:
    """The cache geometry and generation defaults of a decoder, what generate() needs from a file.

    ``kv_shapes[i]`` is ``(kv_heads, key_dim, value_dim)`` of layer ``i``.
    """

    kv_shapes: tuple[tuple[int, int, int], ...]
    vocab_size: int
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    max_new_tokens: int | None = None
    max_length: int = 20
    model_type: str = field(default="")
    #: file name (beside this graph) of a separately compiled graph for the prompt step, or None:
    #: this graph serves prefill and decode alike (see fxcompress.decoder.PREFILL_CHOICE)
    prefill_graph: str | None = None

    @property
    def layers(self) -> int:
        return len(self.kv_shapes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def past_names(self) -> list[str]:
        return [past_name(i, kind) for i in range(self.layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(present_name(i, kind) for i in range(self.layers) for kind in ("key", "value"))]

    def past_shape(self, index: int, batch: int, length: int) -> tuple[int, int, int, int]:
        """Shape of the ``index``-th past tensor (key and value alternate) for ``batch`` rows."""
        heads, key_dim, value_dim = self.kv_shapes[index // 2]
        return (batch, heads, length, key_dim if index % 2 == 0 else value_dim)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DecoderSpec":
        data = json.loads(text)
        data["kv_shapes"] = tuple(tuple(s) for s in data["kv_shapes"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)


def _cache_of(outputs: Any) -> Any:
    """The cache a transformers model returned (``cache`` since transformers 5, ``past_key_values`` before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


class DecoderModule(nn.Module):
    """A causal LM called with flat tensors: the KV cache as explicit inputs and outputs.

    ``forward(input_ids, attention_mask, position_ids, *past)`` with ``past`` the keys and values
    of every layer in turn (``[batch, kv_heads, past_length, head_dim]``; length 0 for prefill)
    returns ``(logits, *present)``, present holding past plus this step's keys and values.
    """

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # No config: plain full-length layers whatever the model's sliding windows (the attention
        # mask applies those), so present is always past + new and the cache shapes stay uniform.
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True)
        present = _cache_of(outputs)
        return (outputs.logits, *(t for layer in present.layers for t in (layer.keys, layer.values)))


def _unsupported_cache(model: nn.Module, what: str) -> InputError:
    return InputError(
        f"{type(model).__name__} {what}; fxcompress's decoder capture and ONNX generate loop serve only "
        f"{SUPPORTED_CACHE}.",
        "use a model whose layers are all full (or sliding-window) attention layers with the dynamic cache: unset "
        "generation_config.cache_implementation (or set it to 'dynamic'), or compile the model without its cache "
        "through fxcompress.compile.",
    )


def check_generation_config(model: nn.Module) -> None:
    """InputError when the model's generation config asks for decoding the ONNX loop cannot do."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    unserved = {}
    for name, neutral in _UNSERVED_GENERATION.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral and not (neutral is None and value in ([], {}, 0, 0.0)):
            unserved[name] = value
    if unserved:
        listed = ", ".join(f"{k}={v!r}" for k, v in unserved.items())
        raise InputError(
            f"{type(model).__name__}'s generation config asks for {listed}, which fxcompress's ONNX generate loop cannot "
            f"serve; it does {SUPPORTED_GENERATION}.",
            "reset those fields on model.generation_config (e.g. model.generation_config.num_beams = 1) before "
            "compiling, or generate with transformers instead.",
        )


def decoder_spec(model: nn.Module) -> DecoderSpec:
    """Check that ``model`` is a causal LM fxcompress can serve and read its cache geometry.

    The geometry comes from one eager step on two tokens, so it is whatever the model really
    caches (GQA heads, GPT-2's fused projections, partial rotary dims alike).

    Raises:
        InputError: not a transformers causal LM, an encoder-decoder, a cache other than the
            dynamic one, or a generation config the loop cannot serve; each names what is supported.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(model, "get_output_embeddings"):
        raise InputError(
            f"compile_decoder takes {SUPPORTED_MODELS}, got {type(model).__name__}.",
            "pass e.g. transformers.AutoModelForCausalLM.from_config(config); compile other models with "
            "fxcompress.compile.",
        )
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(
            f"{type(model).__name__} is an encoder-decoder model; compile_decoder takes {SUPPORTED_MODELS}.",
            "compile its encoder with fxcompress.compile(model.get_encoder(), {'input_ids': ..., 'attention_mask': ...}).",
        )
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "cache" not in parameters and "past_key_values" not in parameters:
        raise _unsupported_cache(model, "takes no KV cache argument (forward() has no `cache`)")
    generation = getattr(model, "generation_config", None)
    implementation = getattr(generation, "cache_implementation", None)
    if implementation not in (None, "dynamic"):
        raise _unsupported_cache(model, f"is configured for the '{implementation}' cache "
                                        "(generation_config.cache_implementation)")
    check_generation_config(model)
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    ids = torch.zeros(1, 2, dtype=torch.long)
    training = {name: m.training for name, m in model.named_modules()}
    try:
        with torch.no_grad():
            outputs = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), cache=DynamicCache(),
                                   use_cache=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the model is not a cache-taking causal LM
        raise InputError(
            f"{type(model).__name__} fails on a two-token prompt with a DynamicCache "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); compile_decoder "
            f"takes {SUPPORTED_MODELS}.",
            "check that model(input_ids=ids, cache=transformers.DynamicCache(), use_cache=True) runs.",
        ) from None
    finally:  # the caller's model keeps its training flags (dropout stays as they set it)
        for name, m in model.named_modules():
            m.training = training.get(name, m.training)
    cache = _cache_of(outputs)
    if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer or layer.keys is None for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}) or [type(cache).__name__]
        raise _unsupported_cache(model, f"returns a {type(cache).__name__} with {', '.join(kinds)} layers")
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.dim() != 3:
        raise InputError(f"{type(model).__name__} returns no [batch, sequence, vocab] logits; compile_decoder takes "
                         f"{SUPPORTED_MODELS}.", "pass the ...ForCausalLM model, not the bare ...Model.")
    eos = getattr(generation, "eos_token_id", None)
    eos = getattr(config, "eos_token_id", None) if eos is None else eos
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    pad = getattr(generation, "pad_token_id", None)

    def setting(name: str, default: Any) -> Any:
        value = getattr(generation, name, None)
        return default if value is None else value

    return DecoderSpec(
        kv_shapes=tuple((int(layer.keys.shape[1]), int(layer.keys.shape[3]), int(layer.values.shape[3]))
                        for layer in cache.layers),
        vocab_size=int(logits.shape[-1]),
        dtype=str(cache.layers[0].keys.dtype).replace("torch.", ""),
        eos_token_ids=eos_ids,
        pad_token_id=None if pad is None else int(pad),
        do_sample=bool(setting("do_sample", False)),
        temperature=float(setting("temperature", 1.0)),
        top_k=setting("top_k", 50),
        top_p=float(setting("top_p", 1.0)),
        max_new_tokens=getattr(generation, "max_new_tokens", None),
        max_length=int(setting("max_length", 20)),
        model_type=str(getattr(config, "model_type", "")),
    )


def step_inputs(spec: DecoderSpec, input_ids: torch.Tensor, past: list[torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The flat graph inputs for ``input_ids`` after ``past`` (None: prefill, empty past).

    ``attention_mask`` covers past and new tokens (default: all ones); positions count the
    unmasked tokens before each one, as transformers' generate does for left-padded prompts.
    """
    batch, length = input_ids.shape
    past_length = 0 if past is None else past[0].shape[2]
    if past is None:
        past = [torch.zeros(spec.past_shape(i, batch, 0), dtype=spec.torch_dtype) for i in range(2 * spec.layers)]
    if attention_mask is None:
        attention_mask = torch.ones(batch, past_length + length, dtype=torch.long)
    # a copy, not a view into the mask-length tensor: torch.export would relate the two lengths
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -length:].clone()
    return (input_ids, attention_mask.long(), positions, *past)


def example_inputs(spec: DecoderSpec, batch: int = 2, sequence: int = 3, past: int = 4,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Capture inputs: every symbolic size at least 2, so that torch.export keeps it symbolic
    (it specializes sizes 0 and 1); the graph still runs with past length 0 and one new token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch, sequence), generator=generator)
    cache = [torch.randn(spec.past_shape(i, batch, past), generator=generator).to(spec.torch_dtype)
             for i in range(2 * spec.layers)]
    return step_inputs(spec, ids, cache)


def dynamic_shapes(spec: DecoderSpec, nested: bool = True) -> Any:
    """torch.export dynamic shapes: symbolic batch, sequence and past lengths.

    ``nested``: the form torch.export wants for :class:`DecoderModule` (the past as one tuple,
    matching ``*past``); otherwise one entry per input, for a captured GraphModule. The
    attention mask's length (past + sequence) is left to torch to relate to the others.
    """
    batch = torch.export.Dim("batch")
    sequence, past = torch.export.Dim("sequence", min=1), torch.export.Dim("past_sequence", min=0)
    head = [{0: batch, 1: sequence}, {0: batch, 1: torch.export.Dim.DYNAMIC}, {0: batch, 1: sequence}]
    cache = [{0: batch, 2: past} for _ in range(2 * spec.layers)]
    return (*head, tuple(cache)) if nested else [*head, *cache]


#: The ONNX name of the attention mask's length, which torch names after an internal symbol.
DIM_NAMES = {("attention_mask", 1): "total_sequence"}
