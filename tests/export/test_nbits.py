"""quantize-weights in ONNX: MatMulNBits / GatherBlockQuantized structure, packing, ORT parity, file size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxcompress
from fxcompress.export.nbits import pack_codes
from fxcompress.passes.block_quant import fake_quantize_blocks
from fxcompress.passes.quantize_weights import QuantizeWeightsPass
from fxcompress.runtime.session import create_session
from tests.passes.test_quantize_weights import tiny_llama


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Independent unpacking: bytes -> unsigned codes, low bits first, ``count`` per row."""
    rows = data.reshape(data.shape[0], -1)
    if bits == 8:
        return rows[:, :count].astype(np.int64)
    low, high = rows & 0x0F, rows >> 4
    return np.stack([low, high], axis=-1).reshape(rows.shape[0], -1)[:, :count].astype(np.int64)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    model, ids = tiny_llama()
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass()], tolerance=1.0)
    path = result.export_onnx(tmp_path_factory.mktemp("nbits") / "llama.onnx")
    return result, ids, onnx.load(str(path)), path


def test_matmulnbits_nodes_carry_the_right_attributes(llama_export):
    result, _, model, _ = llama_export
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulNBits"] == 15 and ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0
    assert not any(n.domain == "fxcompress" for n in graph.node)
    assert {o.domain: o.version for o in model.opset_import}.get("com.microsoft") == 1
    inits = {t.name: t for t in graph.initializer}
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        attrs = _attrs(node)
        assert node.domain == "com.microsoft"
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
        b, scales, zeros = (inits[name] for name in node.input[1:4])
        assert list(b.dims) == [attrs["N"], -(-attrs["K"] // 32), 16] and b.data_type == onnx.TensorProto.UINT8
        assert list(scales.dims) == [attrs["N"], b.dims[1]] and scales.data_type == onnx.TensorProto.FLOAT
        assert list(zeros.dims) == [attrs["N"], -(-b.dims[1] // 2)] and zeros.data_type == onnx.TensorProto.UINT8
    # No float copy of any quantized weight is left in the file.
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                and t.dims[1] >= 32 and "scales" not in t.name]


def test_a_tied_table_read_at_two_precisions_is_stored_once_per_precision(llama_export):
    _, _, model, _ = llama_export
    graph = model.graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and _attrs(n)["N"] == 256)
    assert _attrs(gather)["bits"] == 8 and _attrs(head)["bits"] == 4
    assert not set(gather.input[2:]) & set(head.input[1:])
    tables = sorted(tuple(t.dims) for t in graph.initializer
                    if t.dims and t.dims[0] == 256 and t.data_type == onnx.TensorProto.UINT8)
    # int4 codes + zero points for lm_head, int8 codes for the lookups (symmetric: no zero points); no float table
    assert tables == [(256, 1), (256, 2, 16), (256, 2, 32)]
    assert not [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims and t.dims[0] == 256
                and "scales" not in t.name]


def test_a_tied_table_at_one_precision_is_stored_once(tmp_path):
    model, ids = tiny_llama()
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(embedding_bits=4)], tolerance=1.0)
    graph = onnx.load(str(result.export_onnx(tmp_path / "llama.onnx"))).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and _attrs(n)["N"] == 256)
    assert _attrs(gather) == {"gather_axis": 0, "quantize_axis": 1, "block_size": 32, "bits": 4}
    reshape = next(n for n in graph.node if gather.input[0] in n.output)
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]  # the head's packed B, viewed 2-D
    assert gather.input[2:4] == head.input[2:4]  # the same scales and zero points
    tables = [t for t in graph.initializer if t.dims and t.dims[0] == 256 and t.data_type == onnx.TensorProto.UINT8]
    assert len(tables) == 2  # packed codes + packed zero points, once


def test_module_and_ort_agree(llama_export):
    result, ids, _, path = llama_export
    assert result.report.parity.passed and result.report.parity.drift < 0.02  # accuracy_level=4: int8 activations in ORT
    model, _ = tiny_llama()
    precise = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(accuracy_level=0)], tolerance=1.0)
    precise.export_onnx(path.with_name("precise.onnx"))
    assert precise.report.parity.drift < 1e-5  # float compute: the same weights, fp32 rounding only


def test_packed_weights_dequantize_to_the_module_weights(llama_export):
    result, _, model, _ = llama_export
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gm = result.module
    checked = 0
    for node in gm.graph.nodes:
        if getattr(node.target, "__name__", "") != "nbits_linear":
            continue
        weight, scale, zero = (getattr_path(gm, n.target) for n in node.args[1:4])
        expected = fake_quantize_blocks(weight.detach(), scale, zero, 4, 32).numpy()
        onnx_node = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                         and n.input[2] in inits and inits[n.input[2]].shape == tuple(scale.shape)
                         and np.array_equal(inits[n.input[2]], scale.numpy()))
        n_rows, k = _attrs(onnx_node)["N"], _attrs(onnx_node)["K"]
        blocks = -(-k // 32)
        codes = _unpack(inits[onnx_node.input[1]], 4, blocks * 32).reshape(n_rows, blocks, 32)
        zeros = _unpack(inits[onnx_node.input[3]], 4, blocks).reshape(n_rows, blocks, 1)
        scales = inits[onnx_node.input[2]].reshape(n_rows, blocks, 1)
        dequantized = ((codes - zeros) * scales).reshape(n_rows, -1)[:, :k]
        assert np.allclose(dequantized, expected, atol=1e-6)
        checked += 1
    assert checked == 15


def getattr_path(module: nn.Module, target: str) -> torch.Tensor:
    for part in target.split("."):
        module = getattr(module, part)
    return module


class Ragged(nn.Module):
    """K = 40 and D = 40: not multiples of the block size (padding), an untied table."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 40)
        self.fc = nn.Linear(40, 24)

    def forward(self, ids):
        return self.fc(self.embed(ids))


@pytest.mark.parametrize("bits, block, symmetric", [(4, 32, False), (4, 16, True), (8, 32, None), (8, 16, False)])
def test_padding_symmetry_and_bits_in_ort(tmp_path, bits, block, symmetric):
    torch.manual_seed(0)
    model, ids = Ragged().eval(), torch.randint(0, 100, (2, 7))
    options = {"bits": bits, "embedding_bits": bits, "block_size": block, "symmetric": symmetric, "accuracy_level": 0,
               "min_features": 8}
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(options)], tolerance=1.0)
    path = result.export_onnx(tmp_path / "ragged.onnx")
    assert result.report.parity.drift < 1e-5
    graph = onnx.load(str(path)).graph
    matmul = next(n for n in graph.node if n.op_type == "MatMulNBits")
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    sym = symmetric if symmetric is not None else bits == 8
    assert (matmul.input[3] != "") == (not sym) and len(gather.input) == (3 if sym else 4)
    assert matmul.input[5] == "fc.bias"
    inits = {t.name: t for t in graph.initializer}
    assert list(inits[matmul.input[1]].dims) == [24, -(-40 // block), block * bits // 8]
    assert list(inits[gather.input[0]].dims) == [100, -(-40 // block) * block * bits // 8]
    padded = 40 % block != 0
    assert any(n.op_type == "Slice" and n.input[0] == gather.output[0] for n in graph.node) == padded
    # Fresh ids through ORT, against the module.
    session = create_session(path, "cpu")
    fresh = torch.randint(0, 100, (2, 7))
    got = session.run([fresh])[0]
    with torch.no_grad():
        assert np.allclose(got, result.module(fresh).numpy(), atol=1e-5)


def test_pack_codes_layout():
    codes = np.array([[1, 2, 3, 4]], dtype=np.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43]]
    assert pack_codes(codes, 8).tolist() == [[1, 2, 3, 4]]


def test_int4_weights_file_is_under_a_third_of_fp32(tmp_path):
    model, ids = tiny_llama(vocab=4096, hidden=128)
    calibration = [(torch.randint(0, 4096, (1, 12)),) for _ in range(2)]
    fp32 = fxcompress.compile(model, (ids,), "default").export_onnx(tmp_path / "fp32.onnx").stat().st_size
    int4 = fxcompress.compile(model, (ids,), "int4-weights", calibration=calibration).export_onnx(tmp_path / "int4.onnx")
    assert int4.stat().st_size <= 0.3 * fp32, (int4.stat().st_size, fp32)


def test_fine_tuned_module_exports_its_new_weights(tmp_path):
    """QAT: train result.module a few steps, export again: the file holds the trained weights' codes."""
    torch.manual_seed(0)
    model, ids = Ragged().eval(), torch.randint(0, 100, (2, 7))
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(accuracy_level=0, min_features=8, block_size=16)],
                                tolerance=1.0)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.export_onnx(tmp_path / "a.onnx"))).graph.initializer}
    gm = result.module.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        gm(ids).square().mean().backward()
        optimizer.step()
    gm.eval()
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.export_onnx(tmp_path / "b.onnx"))).graph.initializer}
    assert result.report.parity.drift < 1e-5
    assert not np.array_equal(before["fc.weight_q4"], after["fc.weight_q4"])


def test_saved_module_reloads_and_still_exports_matmulnbits():
    import io

    from fxcompress.export.onnx_export import export_model_proto
    from fxcompress.passes.quantize_weights import nbits_embedding, nbits_linear

    torch.manual_seed(0)
    model, ids = Ragged().eval(), torch.randint(0, 100, (2, 7))
    # remove-guards (in every preset) drops export's guard function, which does not pickle
    result = fxcompress.compile(model, (ids,), ["remove-guards", QuantizeWeightsPass(min_features=8)], tolerance=1.0)
    buffer = io.BytesIO()
    torch.save(result.module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    calls = Counter(n.target for n in loaded.graph.nodes)
    assert calls[nbits_linear] == 1 and calls[nbits_embedding] == 1
    with torch.no_grad():
        assert torch.equal(loaded(ids), result.module(ids))
    proto, notes = export_model_proto(loaded, (ids,))
    assert notes["nbits_weights"] == 2
    assert Counter(n.op_type for n in proto.graph.node)["MatMulNBits"] == 1
