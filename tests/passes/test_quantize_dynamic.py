"""Dynamic int8 linear layers: structure, ORT's fused kernel, parity, idempotence, training."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.passes.quantize_dynamic import QuantizeInt8DynamicPass, dynamic_int8_linear, int8_embedding
from fxcompress.runtime.session import create_session


class Encoderish(nn.Module):
    """Linear layers on a [batch, seq, hidden] tensor with a residual and a layer norm."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 3)
        self.small = nn.Linear(3, 3)

    def forward(self, x):
        h = self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))
        return self.small(self.head(h))


def _compile(**options):
    torch.manual_seed(0)
    model = Encoderish().eval()
    x = torch.randn(1, 8, 32)
    return model, x, fxcompress.compile(model, (x,), [QuantizeInt8DynamicPass(options)])


def test_structure_and_layer_report():
    _, _, result = _compile()
    targets = Counter(n.target for n in result.module.graph.nodes if n.op == "call_function")
    assert targets[dynamic_int8_linear] == 3 and targets[torch.ops.aten.linear.default] == 1  # `small` < min_features
    layers = result.report.records[0].stats["layers"]
    assert [entry["precision"] for entry in layers] == ["int8-dynamic", "int8-dynamic", "int8-dynamic", "float"]
    assert result.report.drift < 0.05


def test_skip_and_idempotence():
    _, _, result = _compile(skip=("head",))
    assert result.report.records[0].stats["quantized_layers"] == 2
    assert not QuantizeInt8DynamicPass()(result.module).modified


def test_exports_as_dynamic_quantize_matmul_with_tight_parity(tmp_path):
    _, _, result = _compile()
    path = result.export_onnx(tmp_path / "dyn.onnx")
    assert result.report.parity.drift < 1e-4  # same integers in torch and ORT
    exported = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert exported["DynamicQuantizeLinear"] == 3 and exported["MatMulInteger"] == 3
    create_session(path, "cpu", optimized_model_path=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["DynamicQuantizeMatMul"] == 3 and ops["MatMulInteger"] == 0


def test_exported_fused_kernel_gets_one_weight_scale(tmp_path):
    """ORT's DynamicQuantizeMatMul runs ~1.5x slower with per-column weight scales: the fused op gets a scalar."""
    _, _, result = _compile()
    create_session(result.export_onnx(tmp_path / "dyn.onnx"), "cpu", optimized_model_path=tmp_path / "opt.onnx")
    graph = onnx.load(str(tmp_path / "opt.onnx")).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    fused = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(fused) == 3 and all(shapes.get(n.input[2], [None]) in ([], [1]) for n in fused)


def test_weight_range(tmp_path):
    """'reduced' keeps weight integers within -63..63 (exact where uint8 x int8 saturates), 'full' uses -127..127."""
    for weight_range, levels in (("reduced", 63), ("full", 127)):
        model, _, result = _compile(weight_range=weight_range)
        scale = result.module._fxqd0_up_scale
        assert torch.allclose(scale, model.up.weight.abs().amax(1) / levels)
        assert result.report.records[0].stats["layers"][0]["weight_levels"] == levels
    # 'auto' chooses by the compiling CPU; either way the export matches the module on this machine
    _, _, result = _compile()
    result.export_onnx(tmp_path / "auto.onnx")
    assert result.report.parity.drift < 1e-4
    with pytest.raises(fxcompress.errors.RecipeError, match="weight_range"):
        QuantizeInt8DynamicPass({"weight_range": "7bit"})


def test_weights_are_stored_as_int8(tmp_path):
    _, _, result = _compile()
    graph = onnx.load(str(result.export_onnx(tmp_path / "dyn.onnx"))).graph
    by_dtype = Counter(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in graph.initializer)
    assert by_dtype["int8"] == 3  # up, down, head; `small` stays float
    float_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert [list(t.dims) for t in float_weights] == [[3, 3]]  # only `small`'s weight is kept in float


def test_trainable():
    _, x, result = _compile()
    gm = result.module.train()
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    target = torch.randn(1, 8, 3)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = ((gm(x)[0] - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert gm.up.weight.grad is not None and losses[-1] < losses[0]


class Tokens(nn.Module):
    """A token embedding (padding row 0) feeding a linear layer: a transformer's first and last steps."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 32, padding_idx=0)
        self.proj = nn.Linear(32, 32)

    def forward(self, ids):
        return self.proj(self.embed(ids))


def _tokens(**options):
    torch.manual_seed(0)
    model, ids = Tokens().eval(), torch.randint(0, 500, (2, 12))
    ids[0, 0] = 0
    return model, ids, fxcompress.compile(model, (ids,), [QuantizeInt8DynamicPass(options)])


def test_embedding_table_is_stored_as_int8_and_dequantized_after_the_lookup(tmp_path):
    _, _, result = _tokens()
    targets = Counter(n.target for n in result.module.graph.nodes if n.op == "call_function")
    assert targets[int8_embedding] == 1 and targets[torch.ops.aten.embedding.default] == 0
    layers = result.report.records[0].stats["layers"]
    assert {"name": "embed", "node": "embedding", "kind": "embedding", "precision": "int8"} in layers
    path = result.export_onnx(tmp_path / "emb.onnx")
    assert result.report.parity.drift < 1e-4  # the same integers in PyTorch and ORT
    graph = onnx.load(str(path)).graph
    tables = [t for t in graph.initializer if list(t.dims) == [500, 32]]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]
    gather = next(n for n in graph.node if n.op_type == "Gather")
    assert gather.input[0] == tables[0].name
    assert next(n for n in graph.node if gather.output[0] in n.input).op_type == "DequantizeLinear"
    _, _, float_table = _tokens(embeddings=False)
    assert path.stat().st_size < 0.5 * float_table.export_onnx(tmp_path / "float.onnx").stat().st_size


def test_int8_embedding_trains_and_keeps_the_padding_row_fixed():
    _, ids, result = _tokens()
    gm = result.module.train()
    loss = gm(ids).square().mean()
    loss.backward()
    grad = gm.embed.weight.grad
    assert grad is not None and grad[0].abs().sum() == 0 and grad[ids[1, 0]].abs().sum() > 0


def test_per_tensor_within_gives_one_scale_only_where_it_costs_little(tmp_path):
    """A layer with even rows takes one weight scale (no ratio Mul in the file); one with a hot row keeps per-row scales."""
    torch.manual_seed(0)
    model = Encoderish().eval()
    with torch.no_grad():
        model.down.weight[0].mul_(100.0)  # one row 100x the others: one scale would flatten the rest
    x = torch.randn(1, 8, 32)
    layers = {}
    for within in (0.0, 0.5):
        result = fxcompress.compile(model, (x,), [QuantizeInt8DynamicPass(per_tensor_within=within)])
        layers[within] = {entry["name"]: entry for entry in result.report.records[0].stats["layers"]}
    assert all(entry.get("weight_scale") in (None, "per-channel") for entry in layers[0.0].values())
    assert layers[0.5]["up"]["weight_scale"] == "per-tensor" and layers[0.5]["up"]["per_tensor_error_growth"] <= 1.5
    assert layers[0.5]["down"]["weight_scale"] == "per-channel" and layers[0.5]["down"]["per_tensor_error_growth"] > 1.5
    result.export_onnx(tmp_path / "mixed.onnx")
    assert result.report.parity.drift < 1e-3
    assert not QuantizeInt8DynamicPass(per_tensor_within=0.5)(result.module).modified


def test_per_tensor_within_must_be_non_negative():
    with pytest.raises(fxcompress.errors.RecipeError, match="per_tensor_within"):
        QuantizeInt8DynamicPass(per_tensor_within=-1.0)
