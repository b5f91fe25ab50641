"""compile_decoder(): a Hugging Face causal LM with its KV cache, compiled and exported as one graph.

    result = fxcompress.compile_decoder(model, recipe="default")
    result.export_onnx("lm.onnx")          # input_ids, attention_mask, position_ids, past_key_values.*
    fxcompress.generate("lm.onnx", ids, max_new_tokens=64)        # greedy, in ONNX Runtime

The model is wrapped by :class:`fxcompress.capture_decoder.DecoderModule` (cache as flat
tensors) and compiled like any model; the passes see an ordinary ATen graph. Export names the
cache inputs and outputs, keeps batch, sequence and past lengths symbolic, checks parity on a
prefill (empty past) and a one-token decode step as well as the capture example, and stores the
cache geometry and generation defaults in the file's metadata for :func:`generate`.

Weight-only presets choose per graph: low-bit weights pay where a step is memory-bound (decode,
one token per row), and dynamic int8 wins where it is compute-bound (a long prompt), so
``int4-weights`` and ``int8-weights`` also compile an ``int8-dynamic`` graph for the prompt step
(:data:`PREFILL_CHOICE`; ``prefill_recipe=`` overrides it). Export then writes two files, the
decoder and ``<name>.prefill.onnx`` beside it, and generate() runs the prompt on the second.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fxcompress.api import MOVED_TO_OPTIONS, CompileOptions, CompileResult, refuse_moved_keywords, run_compile
from fxcompress.calibration import Calibration
from fxcompress.capture_decoder import (
    DECODER_METADATA, DIM_NAMES, DecoderModule, DecoderSpec, decoder_spec, dynamic_shapes, example_inputs, step_inputs,
)
from fxcompress.errors import InputError
from fxcompress.infra.pass_base import Pass
from fxcompress.infra.recipe import Recipe
from fxcompress.runtime.generate import DecoderSession, generate as generate_onnx
from fxcompress.runtime.session import create_session

#: The recipe a preset's prompt (prefill) graph gets, where it differs from the decode graph's.
#: Weight-only int4/int8 speeds decoding (memory-bound) but loses to dynamic int8 on prompts of
#: tens of tokens and more (compute-bound): benchmarks/results/decoder.md, prefill sweep.
PREFILL_CHOICE = {"int4-weights": "int8-dynamic", "int8-weights": "int8-dynamic"}

#: Decoders export at ONNX opset 23: attention becomes one ``Attention`` node and the rotary
#: embedding ``RotaryEmbedding`` instead of some 25 small nodes per layer, which is most of what a
#: one-token decode step spends beside its matmuls (int4 decode 2.6x -> 3.6x fp32: benchmarks/results/decoder.md).
DECODER_OPSET = 23


class DecoderCompileResult(CompileResult):
    """A compiled decoder: :class:`~fxcompress.api.CompileResult` plus ``spec`` (the cache geometry).

    ``module`` takes ``(input_ids, attention_mask, position_ids, *past)`` and returns
    ``(logits, *present)`` (see :func:`fxcompress.capture_decoder.step_inputs` to build them).
    """

    # input_ids, attention_mask, position_ids and every past tensor, read or not: generation binds them by name
    _keeps_unused_inputs = True

    def __init__(self, *args: Any, spec: DecoderSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the cache geometry (layers, heads, head size, vocabulary) the graph was captured with
        self.spec = spec
        #: the separately compiled graph for the prompt step (None: this graph serves prefill too)
        self.prefill: DecoderCompileResult | None = None

    @property
    def graphs(self) -> dict[str, str]:
        """Which recipe each graph got: ``{"prefill": ..., "decode": ...}`` (what the preset chose)."""
        return {"prefill": (self.prefill or self).recipe.name, "decode": self.recipe.name}

    def __repr__(self) -> str:
        chosen = f", prefill graph {self.prefill.recipe.name!r}" if self.prefill is not None else ""
        return super().__repr__()[:-1] + chosen + ")"

    def export_onnx(self, path: str | os.PathLike, **options: Any) -> Path:
        """Export as :meth:`CompileResult.export_onnx`; with a prefill graph, that graph is written
        first as ``<name>.prefill.onnx`` beside ``path`` and named in the decoder's metadata (if the
        decoder's export then fails, the prefill file is removed: nothing is left half-written)."""
        if self.prefill is None:
            return super().export_onnx(path, **options)
        path = Path(path)
        prefill_path = path.with_name(f"{path.stem}.prefill{path.suffix or '.onnx'}")
        self.prefill.export_onnx(prefill_path, **options)
        try:
            metadata = {**(options.pop("metadata", None) or {}),
                        DECODER_METADATA: replace(self.spec, prefill_graph=prefill_path.name).to_json()}
            return super().export_onnx(path, metadata=metadata, **options)
        except BaseException:
            prefill_path.unlink(missing_ok=True)
            prefill_path.with_name(prefill_path.name + ".data").unlink(missing_ok=True)  # a prefill over 2 GB
            raise

    def _export_options(self, dynamic_batch: bool | None) -> dict[str, Any]:
        return {"shapes": dynamic_shapes(self.spec, nested=False), "input_names": self.spec.input_names,
                "output_names": self.spec.output_names, "dim_names": DIM_NAMES, "opset": DECODER_OPSET}

    def _parity_inputs(self, dynamic_batch: bool | None = None) -> list[tuple[torch.Tensor, ...]]:
        # The capture example (batch 2, 3 tokens after 4 cached), a prefill (empty past) and a
        # one-token decode step: the shapes generation runs at, which torch.export never saw.
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, self.spec.vocab_size, (1, 5), generator=generator)
        with torch.no_grad():
            present = list(self._compiled_graph()(*step_inputs(self.spec, prompt))[1:])
        token = torch.randint(0, self.spec.vocab_size, (1, 1), generator=generator)
        return [self.example_inputs, step_inputs(self.spec, prompt), step_inputs(self.spec, token, present)]

    def _export_metadata(self) -> dict[str, Any]:
        return {DECODER_METADATA: self.spec.to_json()}

    def generate(self, input_ids: Any, **options: Any) -> torch.Tensor:
        """Export (checked, in memory; once) and :func:`generate` in ONNX Runtime."""
        session = getattr(self, "_generation_session", None)
        provider = options.pop("provider", "cpu")
        if session is None or session.device != ("cuda" if provider == "cuda" else "cpu"):
            prompt = None if self.prefill is None else create_session(self.prefill.export_proto(), provider)
            session = self._generation_session = DecoderSession(create_session(self.export_proto(), provider),
                                                                self.spec, prompt)
        return generate_onnx(session, input_ids, **options)


def _prefill_batches(spec: DecoderSpec, calibration: Any) -> Calibration:
    """Calibration prompts (token-id tensors ``[batch, length]``) as the graph's prefill inputs."""

    def prefill(index: int, prompt: Any) -> tuple[torch.Tensor, ...]:
        ids = prompt.get("input_ids") if isinstance(prompt, dict) else prompt
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise InputError(f"calibration item {index} is not a [batch, length] tensor of token ids.",
                             "pass prompts as LongTensors (or tokenizer outputs with input_ids).")
        return step_inputs(spec, ids)

    return Calibration(calibration).map(prefill)


@refuse_moved_keywords(MOVED_TO_OPTIONS, "CompileOptions")
def compile_decoder(
    model: nn.Module,
    recipe: str | os.PathLike | Recipe | Sequence[str | Pass] = "default",
    calibration: Any = None,
    *,
    tolerance: float | Mapping[str, float] | None = None,
    evaluate: Callable[[Any], float] | None = None,
    max_metric_drop: float | None = None,
    progress: bool = False,
    prefill_recipe: str | os.PathLike | Recipe | Sequence[str | Pass] | None = "auto",
    options: CompileOptions | None = None,
) -> DecoderCompileResult:
    """Capture a causal LM with its KV cache and run a recipe of passes over it.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral, GPT-2, Phi, ...) using the
            dynamic cache; never modified.
        recipe, tolerance, evaluate, max_metric_drop, progress: as for :func:`fxcompress.compile`;
            ``evaluate`` receives the compiled flat module.
        calibration: prompts for data-driven passes: token-id tensors ``[batch, length]`` (or
            dicts with ``input_ids``), run as prefill steps; any collection
            ``compile`` takes (a generator is read once, also when a prefill graph is compiled too).
        prefill_recipe: the recipe of a separate graph for the prompt step. "auto" (default):
            :data:`PREFILL_CHOICE` for the preset that ran (``int8-dynamic`` under the weight-only
            presets), else none; None: one graph for both. ``result.graphs`` says what was chosen.
        options: a :class:`~fxcompress.api.CompileOptions` for ``instruments``, ``dump_dir``
            (the prefill graph's passes go to ``<dump_dir>/prefill``) and ``executor``; the
            symbolic axes are the decoder's own (batch, sequence and past lengths), so its
            ``dynamic_*`` settings must stay unset.

    Returns:
        A :class:`DecoderCompileResult`; ``export_onnx`` writes one graph for prefill and decode,
        or the decoder and its prefill graph (``<name>.prefill.onnx``) where one was chosen.

    Raises:
        InputError: not a causal LM, a cache other than the dynamic one, or a generation config
            the ONNX loop cannot serve (beam search, ...): each names what is supported.
        CaptureError, RecipeError, PassError, DriftError: as for :func:`fxcompress.compile`.
    """
    options = _decoder_options(options)
    spec = decoder_spec(model)
    wrapper = DecoderModule(model, spec.layers)
    prompts = _prefill_batches(spec, calibration)  # once: both graphs read the same data (a generator is read once)

    def compile_graph(graph_recipe: Any, graph_options: CompileOptions) -> DecoderCompileResult:
        return run_compile(wrapper, example_inputs(spec), graph_recipe, prompts,
                           tolerance=tolerance, evaluate=evaluate, max_metric_drop=max_metric_drop, progress=progress,
                           options=graph_options, dynamic_shapes=dynamic_shapes(spec),
                           make_result=partial(DecoderCompileResult, spec=spec))

    result = compile_graph(recipe, options)
    if isinstance(prefill_recipe, str) and prefill_recipe == "auto":
        prefill_recipe = PREFILL_CHOICE.get(result.recipe.name)
    if prefill_recipe is not None:
        dump = None if options.dump_dir is None else Path(options.dump_dir) / "prefill"
        result.prefill = compile_graph(prefill_recipe, replace(options, dump_dir=dump))
    return result


def _decoder_options(options: Any) -> CompileOptions:
    """compile_decoder's options (default ``CompileOptions()``); InputError for symbolic-axis settings,
    which a decoder graph has already (batch, sequence and past lengths)."""
    if options is None:
        return CompileOptions()
    if isinstance(options, CompileOptions):
        axes = [name for name in ("dynamic_batch", "dynamic_sequence", "dynamic_axes") if getattr(options, name)]
        if axes:
            raise InputError(f"compile_decoder was given options with {', '.join(axes)} set, but a decoder graph's "
                             "batch, sequence and past lengths are symbolic already and no other axis can be.",
                             "leave those options unset for compile_decoder (its instruments, dump_dir and executor "
                             "apply).")
    return options  # run_compile says what form options must have


def generate(model: Any, input_ids: Any, **options: Any) -> torch.Tensor:
    """Generate tokens in ONNX Runtime from an exported decoder (path, bytes, ModelProto,
    :class:`~fxcompress.runtime.generate.DecoderSession`) or a :class:`DecoderCompileResult`.

    ``options`` are :func:`fxcompress.runtime.generate.generate`'s: ``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``eos_token_id``,
    ``attention_mask``, ``provider``. Returns ``[batch, prompt + new]`` token ids.
    """
    if isinstance(model, DecoderCompileResult):
        return model.generate(input_ids, **options)
    return generate_onnx(model, input_ids, **options)


__all__ = ["DecoderCompileResult", "compile_decoder", "generate"]
