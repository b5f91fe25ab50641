"""Decoder LLMs with a KV cache: capture, export, ONNX Runtime logits and generation parity.

Each architecture (Llama, Qwen2, Mistral with a sliding window, GPT-2, Phi; small random
configs) is compiled once with the default recipe and exported once; the tests then check the
file's named, symbolic cache inputs/outputs, ORT logits against the transformers model itself on
a prefill and two decode steps, and 64 greedy tokens against transformers' ``generate``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxcompress
from fxcompress.capture_decoder import DECODER_METADATA, DecoderSpec, step_inputs
from fxcompress.errors import InputError
from fxcompress.numerics import LOSSLESS_TOLERANCE
from fxcompress.runtime.generate import decoder_session, next_token_scores

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _config(name: str):
    common = dict(vocab_size=VOCAB, max_position_embeddings=256)
    t = transformers
    if name == "llama":
        return t.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    if name == "qwen2":
        return t.Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    if name == "mistral":  # a window shorter than prompt + 64 tokens: the mask, not the cache, slides
        return t.MistralConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, sliding_window=16, **common)
    if name == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=48, n_layer=2, n_head=4,
                            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    if name == "phi":  # partial rotary embedding, biases, parallel attention/MLP
        return t.PhiConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **common)
    raise KeyError(name)


# Llama in CI; the others (about 45 s each on 2 cores) run with the slow tests.
ARCHITECTURES = ["llama"] + [pytest.param(name, marks=pytest.mark.slow) for name in ("qwen2", "mistral", "gpt2", "phi")]


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(name)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (transformers model, compile result, ONNX path); each compiled and exported once."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = _model(name)
            result = fxcompress.compile_decoder(model)
            path = result.export_onnx(tmp_path_factory.mktemp(name) / f"{name}.onnx")
            cache[name] = (model, result, path)
        return cache[name]

    return get


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cache_inputs_and_outputs_are_named_with_symbolic_lengths(exported, name):
    model, result, path = exported(name)
    proto = onnx.load(str(path))
    layers = model.config.num_hidden_layers
    inputs = {v.name: _dims(v) for v in proto.graph.input}
    outputs = {v.name: _dims(v) for v in proto.graph.output}
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *past]
    assert list(outputs) == ["logits", *present]
    assert inputs["input_ids"] == ["batch", "sequence"] == inputs["position_ids"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert outputs["logits"] == ["batch", "sequence", VOCAB]
    for key in past:
        assert inputs[key][0] == "batch" and inputs[key][2] == "past_sequence"
        assert all(isinstance(d, int) for d in (inputs[key][1], inputs[key][3]))
    for key in present:
        assert outputs[key][0] == "batch" and "past_sequence" in outputs[key][2] and "sequence" in outputs[key][2]
    spec = DecoderSpec.from_json(next(p.value for p in proto.metadata_props if p.key == DECODER_METADATA))
    assert spec == result.spec and spec.layers == layers and spec.vocab_size == VOCAB
    # the passes saw an ordinary ATen graph: no transformers objects, only tensors in and out
    assert all(n.op != "call_module" for n in result.graph_module.graph.nodes)
    assert result.report.drift <= LOSSLESS_TOLERANCE and result.report.nodes_after < result.report.nodes_before

def test_llama_exports_one_attention_norm_and_rotary_node_each(exported):
    """Opset 23 with fuse-rms-norm and fold-repeat-kv: what a decode step spends beside its matmuls
    (norms, rotary embeddings, attention, copies of the cache for grouped heads) is one node each."""
    model, _, path = exported("llama")
    config = model.config
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Attention"] == config.num_hidden_layers and ops["RotaryEmbedding"] == 2 * config.num_hidden_layers
    assert ops["RMSNormalization"] == 2 * config.num_hidden_layers + 1
    assert not ops["Softmax"] and not ops["ReduceMean"] and not ops["Sqrt"]
    # the attention reads the cache's key/value heads as they are (no repeat_kv copy in between)
    shapes = {v.name: _dims(v) for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    for node in (n for n in proto.graph.node if n.op_type == "Attention"):
        assert shapes[node.input[0]][1] == config.num_attention_heads
        assert shapes[node.input[1]][1] == shapes[node.input[2]][1] == config.num_key_value_heads



def _hf_step(model, ids, cache, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    return out.logits.numpy()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ort_logits_match_the_transformers_model_at_prefill_and_decode(exported, name):
    model, result, path = exported(name)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = result.spec
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=generator)
    cache = transformers.DynamicCache()
    mask = torch.ones_like(prompt)
    expected = _hf_step(model, prompt, cache, mask)
    outputs = session.run(None, {k: v.numpy() for k, v in zip(spec.input_names, step_inputs(spec, prompt))})
    assert outputs[1].shape[2] == 7  # present = empty past + 7 new positions
    np.testing.assert_allclose(outputs[0], expected, atol=2e-5, rtol=1e-4)
    past = [torch.from_numpy(o) for o in outputs[1:]]
    for step in range(2):  # one-token decode steps on the cache ORT returned
        token = torch.randint(0, VOCAB, (2, 1), generator=generator)
        mask = torch.ones(2, mask.shape[1] + 1, dtype=torch.long)
        expected = _hf_step(model, token, cache, mask)
        outputs = session.run(None, {k: v.numpy() for k, v in zip(spec.input_names, step_inputs(spec, token, past, mask))})
        np.testing.assert_allclose(outputs[0], expected, atol=2e-5, rtol=1e-4)
        past = [torch.from_numpy(o) for o in outputs[1:]]
        assert past[0].shape[2] == 8 + step


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_greedy_64_tokens_match_transformers_generate(exported, name):
    model, _, path = exported(name)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    ours = fxcompress.generate(path, prompt, max_new_tokens=64, eos_token_id=None)
    # an explicit mask: without one, generate() masks prompt tokens equal to pad_token_id
    reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert ours.shape == (1, 70)
    assert torch.equal(ours, reference)


def test_left_padded_batch_and_eos_match_transformers_generate(exported):
    model, _, path = exported("llama")
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(prompt)
    prompt[1, :2], mask[1, :2] = 0, 0  # row 1 is a 4-token prompt, left-padded
    reference = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    ours = fxcompress.generate(path, prompt, attention_mask=mask, max_new_tokens=24, eos_token_id=None)
    assert torch.equal(ours, reference)
    # an end-of-sequence id stops a row and pads it, as transformers does
    stop = int(reference[0, 10])
    reference = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=stop,
                               pad_token_id=0)
    ours = fxcompress.generate(path, prompt, attention_mask=mask, max_new_tokens=24, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(ours, reference)


def test_sampling_is_reproducible_for_a_seed(exported):
    _, result, path = exported("llama")
    session = decoder_session(path)  # one session, several generations
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    first = fxcompress.generate(session, prompt, max_new_tokens=32, do_sample=True, seed=11, temperature=1.5)
    again = fxcompress.generate(session, prompt, max_new_tokens=32, do_sample=True, seed=11, temperature=1.5)
    other = fxcompress.generate(session, prompt, max_new_tokens=32, do_sample=True, seed=12, temperature=1.5)
    greedy = fxcompress.generate(session, prompt, max_new_tokens=32, eos_token_id=None)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, greedy)
    # top_k=1 leaves only the argmax: sampling is then greedy decoding
    assert torch.equal(fxcompress.generate(session, prompt, max_new_tokens=32, do_sample=True, seed=3, top_k=1,
                                           eos_token_id=None), greedy)
    # a compile result generates too (exported and checked in memory)
    assert torch.equal(result.generate(prompt, max_new_tokens=8, eos_token_id=None), greedy[:, :13])


def test_top_k_and_top_p_filter_as_transformers_does():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.count_nonzero(next_token_scores(logits, 1.0, 2, 1.0)) == 2
    kept = next_token_scores(logits, 1.0, None, 0.7)  # 0.5 < 0.7, 0.8 >= 0.7: two tokens
    np.testing.assert_allclose(kept, [[0.625, 0.375, 0.0, 0.0]])
    assert np.count_nonzero(next_token_scores(logits, 1.0, None, 0.1)) == 1  # the top token always stays
    sharp = next_token_scores(logits, 0.1, None, 1.0)
    assert sharp[0, 0] > 0.99


def test_int8_dynamic_runs_on_the_decoder_graph(tmp_path):
    model = _model("llama")
    result = fxcompress.compile_decoder(model, recipe="int8-dynamic")
    assert any(r.modified and "quantize" in r.name for r in result.report.records)
    path = result.export_onnx(tmp_path / "int8.onnx")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    tokens = fxcompress.generate(path, prompt, max_new_tokens=16, eos_token_id=None)
    assert tokens.shape == (1, 22)


def test_t5_encoder_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = transformers.T5EncoderModel(config).eval()
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    result = fxcompress.compile(model, inputs)
    path = result.export_onnx(tmp_path / "t5.onnx")
    assert result.report.parity.passed
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


# --- bad input -----------------------------------------------------------------------------------


def _one_paragraph(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and "Fix:" in text
    return text


def test_a_static_cache_is_refused_naming_the_dynamic_cache(tmp_path):
    model = _model("llama")
    model.generation_config.cache_implementation = "static"
    with pytest.raises(InputError) as caught:
        fxcompress.compile_decoder(model)
    text = _one_paragraph(caught.value)
    assert "'static'" in text and "DynamicCache" in text
    assert list(tmp_path.iterdir()) == []


def test_a_generation_config_the_loop_cannot_serve_is_refused(tmp_path):
    model = _model("llama")
    model.generation_config.num_beams = 4
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(InputError) as caught:
        fxcompress.compile_decoder(model)
    text = _one_paragraph(caught.value)
    assert "num_beams=4" in text and "repetition_penalty=1.3" in text and "greedy" in text and "sampling" in text


def test_generate_refuses_beam_search_and_bad_options(exported):
    _, _, path = exported("llama")
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(InputError, match="beam search"):
        fxcompress.generate(path, prompt, num_beams=2)
    with pytest.raises(InputError, match="temperature"):
        fxcompress.generate(path, prompt, do_sample=True, temperature=0)
    with pytest.raises(InputError, match="vocabulary"):
        fxcompress.generate(path, prompt + VOCAB)


def test_models_that_are_not_causal_lms_are_refused():
    with pytest.raises(InputError, match="causal LM"):
        fxcompress.compile_decoder(torch.nn.Linear(3, 3))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32,
                                                                       num_layers=1, num_heads=2))
    with pytest.raises(InputError, match="encoder-decoder"):
        fxcompress.compile_decoder(t5)
    bare = transformers.LlamaModel(_config("llama"))
    with pytest.raises(InputError, match="logits"):
        fxcompress.compile_decoder(bare)


def test_generate_refuses_an_onnx_file_that_is_not_a_decoder(tmp_path):
    result = fxcompress.compile(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
    path = result.export_onnx(tmp_path / "linear.onnx")
    with pytest.raises(InputError, match="compile_decoder"):
        fxcompress.generate(path, torch.zeros(1, 2, dtype=torch.long))


def test_compile_of_a_causal_lm_with_its_cache_points_at_compile_decoder():
    model = _model("qwen2")
    with pytest.raises(fxcompress.CaptureError) as caught:
        fxcompress.compile(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    assert "compile_decoder" in _one_paragraph(caught.value)


def test_the_callers_model_is_left_untouched():
    model = _model("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.generation_config.to_dict()
    fxcompress.compile_decoder(model, recipe="int8-dynamic")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.generation_config.to_dict() == config
