"""Per-graph precision for decoders: weight-only presets pair the decode graph with an
``int8-dynamic`` prefill graph; export writes both, generate() runs the prompt on the first and
every later token on the second."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import fxcompress
from fxcompress.capture_decoder import DECODER_METADATA, DecoderSpec, step_inputs
from fxcompress.errors import InputError
from fxcompress.runtime.generate import decoder_session

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def paired(model, tmp_path_factory):
    result = fxcompress.compile_decoder(model, recipe="int4-weights")
    path = result.export_onnx(tmp_path_factory.mktemp("paired") / "lm.onnx")
    return result, path


def _op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_weight_only_preset_chooses_int8_dynamic_for_the_prompt_and_says_so(paired):
    result, path = paired
    assert result.graphs == {"prefill": "int8-dynamic", "decode": "int4-weights"}
    assert "prefill graph 'int8-dynamic'" in repr(result)
    prefill_path = path.with_name("lm.prefill.onnx")
    assert sorted(p.name for p in path.parent.iterdir()) == ["lm.onnx", "lm.prefill.onnx"]
    assert "MatMulNBits" in _op_types(path) and "MatMulNBits" not in _op_types(prefill_path)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & _op_types(prefill_path)
    proto = onnx.load(str(path))
    spec = DecoderSpec.from_json(next(p.value for p in proto.metadata_props if p.key == DECODER_METADATA))
    assert spec.prefill_graph == "lm.prefill.onnx"


def _spinning(session) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set
        return None


def test_generate_runs_the_prompt_on_the_prefill_graph_then_decodes_on_the_decoder(paired):
    result, path = paired
    session = decoder_session(path)
    assert session.prefill is not None
    # the prompt session runs once per generation: its threads must not spin beside the decoder's
    assert _spinning(session.prefill.session) == "0" and _spinning(session.runtime.session) is None  # None: ORT's default (on)
    prompt = torch.tensor([[5, 17, 33, 2, 9, 41]])
    tokens = fxcompress.generate(session, prompt, max_new_tokens=3, eos_token_id=None)
    # the same two steps by hand: prompt through the prefill file, next token through the decoder file
    spec = session.spec
    prefill = session.prefill.session
    decode = session.runtime.session
    feeds = dict(zip(spec.input_names, (t.numpy() for t in step_inputs(spec, prompt))))
    logits, *present = prefill.run(None, feeds)
    first = int(logits[0, -1].argmax())
    step = step_inputs(spec, torch.tensor([[first]]), [torch.from_numpy(p) for p in present])
    logits, *_ = decode.run(None, dict(zip(spec.input_names, (t.numpy() for t in step))))
    second = int(logits[0, -1].argmax())
    assert tokens[0, prompt.shape[1]:prompt.shape[1] + 2].tolist() == [first, second]
    # the decode graph's own prompt logits differ (int4 vs int8): the pairing is what ran
    own, *_ = decode.run(None, feeds)
    assert not np.allclose(own, prefill.run(None, feeds)[0])
    # the in-memory result generates the same tokens as its files
    assert torch.equal(result.generate(prompt, max_new_tokens=3, eos_token_id=None), tokens)


def test_a_decoder_file_without_its_prefill_graph_is_refused_clearly(paired, tmp_path):
    _, path = paired
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(path.read_bytes())
    with pytest.raises(InputError, match="separate prefill graph.*not found") as info:
        decoder_session(alone)
    assert "keep the two files" in str(info.value)
    assert decoder_session(alone, prefill=path.with_name("lm.prefill.onnx")).prefill is not None


def test_prefill_recipe_none_gives_one_graph_and_an_explicit_choice_is_honoured(model, tmp_path):
    single = fxcompress.compile_decoder(model, recipe="int8-weights", prefill_recipe=None)
    assert single.prefill is None and single.graphs == {"prefill": "int8-weights", "decode": "int8-weights"}
    single.export_onnx(tmp_path / "one.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["one.onnx"]
    assert fxcompress.compile_decoder(model).prefill is None  # lossless default: one graph
    chosen = fxcompress.compile_decoder(model, recipe="int8-weights", prefill_recipe="default")
    assert chosen.graphs == {"prefill": "default", "decode": "int8-weights"}


def test_decoder_result_is_built_as_one_and_options_apply_to_both_graphs(model, tmp_path):
    from fxcompress.decoder import DecoderCompileResult

    result = fxcompress.compile_decoder(model, recipe="int8-weights",
                                        options=fxcompress.CompileOptions(dump_dir=tmp_path / "ir"))
    assert type(result) is DecoderCompileResult and type(result.prefill) is DecoderCompileResult
    assert result.spec == result.prefill.spec and result.prefill.prefill is None
    assert any((tmp_path / "ir").glob("*.txt")) and any((tmp_path / "ir" / "prefill").glob("*.txt"))
    with pytest.raises(fxcompress.InputError, match="symbolic already"):
        fxcompress.compile_decoder(model, options=fxcompress.CompileOptions(dynamic_batch=True))
    with pytest.raises(fxcompress.InputError, match="options object now"):
        fxcompress.compile_decoder(model, dump_dir=tmp_path)


def test_a_failed_decoder_export_leaves_no_prefill_file(paired, tmp_path, monkeypatch):
    result, _ = paired
    from fxcompress.api import CompileResult

    original = CompileResult.export_onnx

    def failing(self, path, **options):
        if self is result:  # the prefill graph exports, the decoder does not
            raise RuntimeError("simulated export failure")
        return original(self, path, **options)

    monkeypatch.setattr(CompileResult, "export_onnx", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        result.export_onnx(tmp_path / "lm.onnx")
    assert list(tmp_path.iterdir()) == []


def test_gptq_calibrates_on_prompts_of_any_length(model):
    """The decoder graph is symbolic in batch, sequence and past: calibration prompts need not
    have the capture example's shape (GPTQ through compile_decoder used to refuse them)."""
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (1, 5), generator=generator), torch.randint(0, 96, (2, 9), generator=generator),
               torch.randint(0, 96, (1, 17), generator=generator)]
    result = fxcompress.compile_decoder(model, recipe="int4-weights", calibration=prompts, prefill_recipe=None)
    record = next(r for r in result.report.records if r.name == "quantize-weights")
    assert record.stats["method"] == "gptq" and "fallback" not in record.stats
    with pytest.raises(InputError, match="token ids"):
        fxcompress.compile_decoder(model, recipe="int4-weights", calibration=[torch.randn(1, 5)], prefill_recipe=None)


def test_a_generator_of_prompts_calibrates_both_graphs(model):
    """compile_decoder builds one Calibration for both of its compiles: a generator, which can be
    read only once, calibrates the decode graph and the prefill graph alike (the prefill compile
    used to get the exhausted generator and refuse it as empty)."""
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 96, (1, n), generator=generator) for n in (5, 9, 7)]
    result = fxcompress.compile_decoder(model, recipe="int4-weights", calibration=(p for p in prompts),
                                        prefill_recipe="int4-weights")  # GPTQ in both graphs: both read the data
    for graph in (result, result.prefill):
        record = next(r for r in graph.report.records if r.name == "quantize-weights")
        assert record.stats["method"] == "gptq" and record.stats["calibration_batches"] == 3
