"""bf16 / fp16 models as users load them (issue 26, item 2): compiled and exported in their own
dtype, quantized from it, never upcast whole to fp32.

What "never upcast whole" is checked by: the float32 tensors of the compiled module and the
float32 initializers of the file are a small fraction of the weights (quantization scales, rotary
tables), and the weights themselves keep the model's dtype (or become int8 / int4 codes).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxcompress
from fxcompress.export.half import STORED_SUFFIX, WEIGHTS_DTYPE_PROP, compute_in_float
from fxcompress.numerics import half_parity_floor, model_float_dtype

HALF = [torch.bfloat16, torch.float16]
ONNX_TYPE = {torch.bfloat16: TensorProto.BFLOAT16, torch.float16: TensorProto.FLOAT16}


def _cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(),
                         nn.Linear(64, 10)).to(dtype).eval()


def _llama(dtype: torch.dtype) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _float_bytes(tensors, dtype: torch.dtype) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors if t.dtype == dtype)


def _stored_bytes(model: nn.Module) -> int:
    return sum(p.nelement() * p.element_size() for p in model.parameters())


def _initializers(path) -> list[onnx.TensorProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.initializer)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_float_export_keeps_the_models_dtype(dtype, tmp_path):
    model = _cnn(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    result = fxcompress.compile(model, x, "default")
    assert {p.dtype for p in result.module.parameters()} == {dtype}  # no fp32 copy of any weight
    assert result.report.extra["model_dtype"] == str(dtype).removeprefix("torch.")
    path = result.export_onnx(tmp_path / "m.onnx")  # parity passed, or it raises
    weights = [t for t in _initializers(path) if len(t.dims) >= 2]
    assert weights and {t.data_type for t in weights} == {ONNX_TYPE[dtype]}
    assert result.report.parity.drift <= half_parity_floor(dtype)
    model_proto = onnx.load(str(path))
    props = {p.key: p.value for p in model_proto.metadata_props}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if dtype is torch.bfloat16:  # float32 arithmetic over bf16 weights: each read through one Cast
        assert props[WEIGHTS_DTYPE_PROP] == "bfloat16"
        assert all(t.name.endswith(STORED_SUFFIX) for t in weights)
        assert session.get_inputs()[0].type == "tensor(float)"
        feed = x.float().numpy()
    else:  # ORT runs fp16 graphs: kept as fp16 end to end
        assert WEIGHTS_DTYPE_PROP not in props
        assert session.get_inputs()[0].type == "tensor(float16)"
        feed = x.numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: feed})
    want = result.module(x).float().detach().numpy()
    assert np.abs(got.astype(np.float32) - want).max() <= half_parity_floor(dtype) * np.abs(want).max()


@pytest.mark.parametrize("dtype,recipe,op", [(torch.bfloat16, "int4-weights", "MatMulNBits"),
                                             (torch.float16, "int8-dynamic", "DynamicQuantizeLinear")],
                         ids=["bf16-int4", "fp16-int8dyn"])
def test_decoder_quantizes_from_the_stored_dtype(dtype, recipe, op, tmp_path):
    model = _llama(dtype)
    result = fxcompress.compile_decoder(model, recipe, prefill_recipe=None)
    assert any(r.modified and r.name.startswith("quantize") for r in result.report.records)
    tensors = [*result.module.parameters(), *result.module.buffers()]
    # the weights stay in the model's dtype; float32 is only what quantization adds (scales), far less
    assert _float_bytes(tensors, torch.float32) < 0.25 * _stored_bytes(model)
    assert _float_bytes(tensors, dtype) > 0.5 * _stored_bytes(model)
    path = result.export_onnx(tmp_path / "m.onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    assert op in {n.op_type for n in graph.node}
    float_init = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer if t.data_type == TensorProto.FLOAT)
    assert float_init < 0.25 * _stored_bytes(model)
    assert not any(t.data_type == TensorProto.BFLOAT16 and not t.name.endswith(STORED_SUFFIX) for t in graph.initializer)


def test_compute_in_float_widens_values_and_casts_bf16_initializers():
    w = (helper.make_tensor("w", TensorProto.BFLOAT16, [4, 4], np.ones(16, dtype=np.float32).tolist()))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Cast", ["y"], ["z"], to=TensorProto.BFLOAT16)],
        "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.BFLOAT16, [2, 4])], [w])
    model, count = compute_in_float(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert count == 1
    assert model.graph.initializer[0].name == "w" + STORED_SUFFIX and model.graph.initializer[0].data_type == TensorProto.BFLOAT16
    assert model.graph.node[0].op_type == "Cast" and model.graph.node[0].output == ["w"]
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.node[-1].attribute[0].i == TensorProto.FLOAT
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (z,) = session.run(None, {"x": np.full((2, 4), 2.0, dtype=np.float32)})
    np.testing.assert_allclose(z, np.full((2, 4), 8.0))
    assert compute_in_float(model)[1] == 0  # idempotent: nothing bf16 is left


def test_model_float_dtype_and_parity_floor():
    assert model_float_dtype(_cnn(torch.bfloat16)) is torch.bfloat16
    assert model_float_dtype(nn.Linear(2, 2)) is torch.float32
    assert half_parity_floor(torch.float32) == 1e-4
    assert half_parity_floor(torch.float16) < half_parity_floor(torch.bfloat16) < 0.1


def test_bf16_decoder_file_generates_as_float32_arithmetic_over_the_bf16_weights(tmp_path):
    # The file computes in float32 over the stored bf16 weights: greedy tokens are those of the same
    # weights in float32 (torch's own bf16 arithmetic rounds differently and may pick other tokens).
    model = _llama(torch.bfloat16)
    path = fxcompress.compile_decoder(model, "default").export_onnx(tmp_path / "m.onnx")
    ids = torch.tensor([[1, 5, 7, 9]])
    got = fxcompress.generate(str(path), ids, max_new_tokens=6)
    want = model.float().generate(ids, max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()
