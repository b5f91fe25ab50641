"""Static int8 quantization: placement, ORT int8 kernels, calibrators, errors, mixed precision, QAT."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import InputError, RecipeError
from fxcompress.infra.context import CompileContext
from fxcompress.infra.registry import create_pass
from fxcompress.passes.calibrators import TensorStats, affine_params, choose_range
from fxcompress.graph_meta import QUANT_META
from fxcompress.passes.quantize import QuantizeInt8Pass
from fxcompress.rewrite.matchers import attribute
from fxcompress.runtime.session import create_session
from tests.models import Residual, randomize_bn

aten = torch.ops.aten
FQ_TENSOR = aten.fake_quantize_per_tensor_affine.default
FQ_CHANNEL = aten.fake_quantize_per_channel_affine.default


def _residual():
    torch.manual_seed(0)
    return randomize_bn(Residual()).eval(), (torch.randn(1, 3, 12, 12),)


def _calibration(n: int = 6, shape=(1, 3, 12, 12)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=g),) for _ in range(n)]


def _compile(model, inputs, calibration=None, tolerance=None, **options):
    return fxcompress.compile(model, inputs, ["fold-batchnorm", QuantizeInt8Pass(options)], tolerance=tolerance,
                              calibration=_calibration() if calibration is None else calibration)


def _targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _record(result, name="quantize-int8"):
    return next(r for r in result.report.records if r.name == name)


def test_structure_weights_per_channel_activations_after_fused_relu():
    model, inputs = _residual()
    result = _compile(model, inputs)
    gm = result.module
    counts = _targets(gm)
    assert counts[FQ_CHANNEL] == 4  # 3 convs + fc
    for node in gm.graph.nodes:
        if node.target is aten.conv2d.default:
            assert node.args[0].target is FQ_TENSOR and node.args[1].target is FQ_CHANNEL
            # the conv's only reader is its ReLU (no Q/DQ between them) or the residual add's Q
            (user,) = node.users
            assert user.target in (aten.relu.default, FQ_TENSOR)
            if user.target is aten.relu.default:
                assert [u.target for u in user.users] == [FQ_TENSOR]
        if node.target is FQ_TENSOR:
            _, scale, zero_point, qmin, qmax = node.args
            assert (qmin, qmax) == (0, 255) and 0 <= zero_point <= 255 and scale > 0
        if node.target is FQ_CHANNEL:
            assert node.args[3:] == (0, -128, 127) and not node.args[2].meta["val"].any()
    add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    assert all(a.target is FQ_TENSOR for a in add.args[:2])
    layers = _record(result).stats["layers"]
    assert [(entry["kind"], entry["precision"]) for entry in layers] == [
        ("conv", "int8"), ("conv", "int8"), ("conv", "int8"), ("add", "int8"), ("linear", "int8")]
    assert result.report.drift < 0.05


def test_idempotent_second_run_changes_nothing():
    model, inputs = _residual()
    gm = _compile(model, inputs).module
    quantize = QuantizeInt8Pass()
    quantize.bind(CompileContext(inputs, lambda: iter(_calibration())))
    assert not quantize(gm).modified


def test_every_conv_and_gemm_runs_as_int8_kernel_in_ort(tmp_path):
    model, inputs = _residual()
    result = _compile(model, inputs)
    path = result.export_onnx(tmp_path / "q.onnx")
    assert result.report.parity.passed and result.report.parity.drift < 1e-3
    exported = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert exported["QuantizeLinear"] > 0 and exported["DequantizeLinear"] > 0
    create_session(path, "cpu", optimized_model_path=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1 and ops["QLinearAdd"] == 1
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm"} & set(ops), ops


def test_weight_range_reduced_keeps_weight_integers_within_63_and_parity_exact(tmp_path):
    """x86 without VNNI saturates uint8 x int8 pair sums: 'reduced' weights (-63..63) cannot overflow them."""
    model, inputs = _residual()
    for weight_range, levels in (("reduced", 63), ("full", 127)):
        result = _compile(model, inputs, weight_range=weight_range)
        assert _record(result).stats["weight_levels"] == levels
        for node in result.module.graph.nodes:
            if node.target is FQ_CHANNEL:
                weight, scale = (attribute(result.module, a.target) for a in node.args[:2])
                integers = torch.round(weight / scale.reshape(-1, *[1] * (weight.dim() - 1)))
                assert int(integers.abs().max()) == levels
    result = _compile(model, inputs, weight_range="reduced")
    result.export_onnx(tmp_path / "reduced.onnx")
    assert result.report.parity.drift < 1e-3  # on any CPU
    with pytest.raises(RecipeError, match="weight_range"):
        QuantizeInt8Pass({"weight_range": "7bit"})


@pytest.mark.parametrize("preset", ["quantize-int8", "int8"])
def test_silu_and_squeeze_excitation_run_as_int8_kernels_in_ort(tmp_path, preset):
    from tests.passes.test_equalize import Gated

    torch.manual_seed(0)
    model, inputs = Gated().eval(), (torch.randn(1, 3, 12, 12),)
    calibration = _calibration(8)
    if preset == "int8":  # equalize-layers scales the gate: a float multiply on C values stays before the product
        result = fxcompress.compile(model, inputs, "int8", calibration=calibration, tolerance=1.0)
    else:
        result = _compile(model, inputs, calibration, tolerance=1.0)
    gm = result.module
    assert aten.silu.default not in _targets(gm)  # x * sigmoid(x), a Q after each
    for node in gm.graph.nodes:
        if node.target in (aten.sigmoid.default, aten.mul.Tensor) and len(node.users) == 1 and \
                next(iter(node.users)).target is not aten.mul.Tensor:
            assert [u.target for u in node.users] == [FQ_TENSOR], node
    layers = Counter(entry["kind"] for entry in _record(result).stats["layers"])
    assert layers["sigmoid"] == 3 and layers["mul"] >= 3  # two SiLUs and the gate; their products
    path = result.export_onnx(tmp_path / "q.onnx")
    create_session(path, "cpu", optimized_model_path=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearSigmoid"] == 3 and ops["QLinearMul"] == 3 and ops["QLinearConv"] == 5, ops
    assert "Sigmoid" not in ops and ops["Mul"] == (1 if preset == "int8" else 0), ops


def test_shape_only_ops_and_max_pool_reuse_the_source_parameters():
    class PoolFlatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            y = torch.max_pool2d(torch.relu(self.conv(x)), 2)
            return self.fc(torch.flatten(y, 1))

    # structure only: 6 calibration inputs of a tiny random model clip its logits (drift ~0.2)
    result = _compile(PoolFlatten().eval(), (torch.randn(1, 3, 12, 12),), tolerance=1.0)
    gm = result.module
    fc = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    mirror = fc.args[0]
    relu_q = next(n for n in gm.graph.nodes if n.target is FQ_TENSOR and n.args[0].target is aten.relu.default)
    assert mirror.target is FQ_TENSOR and mirror.args[0].target is aten.flatten.using_ints
    assert mirror.args[1:] == relu_q.args[1:]  # identical scale and zero point: exact, ORT drops the pair


def test_calibration_batches_larger_than_the_example_batch_are_split():
    model, inputs = _residual()
    result = _compile(model, inputs, calibration=[(torch.randn(4, 3, 12, 12),), (torch.randn(2, 3, 12, 12),)])
    assert _record(result).stats["calibration_batches"] == 6


@pytest.mark.parametrize("calibration, message", [
    (None, "needs calibration data"),
    ([], "needs calibration data"),
    ([(torch.randn(1, 3, 10, 10),)], "shapes and dtypes must match"),
    ([(torch.randn(3, 3, 12, 12, dtype=torch.float64),)], "shapes and dtypes must match"),
    ([(torch.randn(1, 3, 12, 12), torch.randn(1))], "one tensor per model input"),
    ([(torch.full((1, 3, 12, 12), float("nan")),)], "NaN or Inf"),
])
def test_bad_calibration_is_a_clear_input_error(calibration, message):
    model, inputs = _residual()
    with pytest.raises(InputError, match=message) as info:
        fxcompress.compile(model, inputs, ["quantize-int8"], calibration=calibration)
    assert "Fix:" in str(info.value)


def test_unknown_calibrator_and_bad_options_are_recipe_errors():
    with pytest.raises(RecipeError, match="calibrator"):
        create_pass("quantize-int8", {"calibrator": "kl-divergence"})
    with pytest.raises(RecipeError, match="ops"):
        create_pass("quantize-int8", {"ops": ["conv", "lstm"]})
    with pytest.raises(RecipeError, match="max_drift"):
        create_pass("quantize-int8", {"max_drift": -1.0})


def _stats(values: torch.Tensor, calibrator: str) -> TensorStats:
    stats = TensorStats()
    stats.observe_range(values)
    if calibrator != "minmax":
        stats.observe_histogram(values)
    return stats


@pytest.mark.parametrize("calibrator", ["percentile", "entropy"])
def test_histogram_calibrators_clip_a_rare_outlier_that_minmax_keeps(calibrator):
    values = torch.cat([torch.randn(20000).abs(), torch.tensor([60.0])])
    lo, hi = choose_range(_stats(values, "minmax"), "minmax")
    assert (lo, hi) == (0.0, 60.0)
    lo, hi = choose_range(_stats(values, calibrator), calibrator, percentile=99.9)
    assert lo == 0.0 and 1.5 < hi < 20.0


def _quantization_mse(values: torch.Tensor, lo: float, hi: float) -> float:
    p = affine_params(lo, hi)
    q = torch.fake_quantize_per_tensor_affine(values, p.scale, p.zero_point, p.quant_min, p.quant_max)
    return float(((q - values) ** 2).mean())


def test_mse_calibrator_minimises_the_actual_quantization_error_on_heavy_tails():
    values = torch.distributions.Laplace(0.0, 1.0).sample((100000,))
    errors = {c: _quantization_mse(values, *choose_range(_stats(values, c), c)) for c in ("minmax", "percentile", "mse")}
    assert errors["mse"] < errors["minmax"] * 0.9 and errors["mse"] <= errors["percentile"]


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibrator_quantizes_a_model_within_tolerance(calibrator):
    model, inputs = _residual()
    result = _compile(model, inputs, calibrator=calibrator, tolerance=1.0)
    assert _record(result).stats["calibrator"] == calibrator
    # entropy clips hardest (0.085 measured on this model); the others stay near 0.01
    assert result.report.drift < 0.15


def test_affine_params_match_onnx_uint8_and_int8_conventions():
    p = affine_params(-1.0, 3.0, "uint8")
    assert (p.quant_min, p.quant_max) == (0, 255) and p.zero_point == round(1.0 / p.scale)
    assert p.scale == pytest.approx(4.0 / 255)
    s = affine_params(-1.0, 3.0, "int8")
    assert s.zero_point == 0 and s.scale == pytest.approx(3.0 / 127)
    assert affine_params(0.0, 0.0).scale == 1.0  # a constant-zero tensor still gets a usable scale


def test_skip_by_name_kind_and_first_last_policy():
    model, inputs = _residual()
    result = _compile(model, inputs, skip=("fc", "add"), first_layer="float")
    layers = {entry["name"]: entry for entry in _record(result).stats["layers"]}
    assert layers["fc"]["precision"] == "float" and layers["fc"]["reason"] == "skip"
    assert layers["add"]["precision"] == "float"
    assert layers["stem"]["precision"] == "float" and layers["stem"]["reason"] == "first_layer"
    assert layers["conv1"]["precision"] == "int8"
    fc = next(n for n in result.module.graph.nodes if n.target is aten.linear.default)
    assert fc.args[1].op == "get_attr"  # weight left in float
    stem = next(n for n in result.module.graph.nodes if n.target is aten.conv2d.default)
    assert stem.args[1].op == "get_attr"


def test_max_drift_keeps_the_most_sensitive_layers_in_float():
    model, inputs = _residual()
    loose = _record(_compile(model, inputs, max_drift=1.0)).stats
    assert loose["float_layers"] == 0 and all("sensitivity" in entry for entry in loose["layers"])
    full_drift = loose["calibration_drift"]
    budget = full_drift / 4
    tight = _record(_compile(model, inputs, max_drift=budget)).stats
    floats = [entry for entry in tight["layers"] if entry["precision"] == "float"]
    assert floats and all(entry["reason"] == "max_drift" for entry in floats)
    assert tight["calibration_drift"] <= budget < full_drift
    # the layers sent back to float are the most sensitive ones
    worst = max(entry["sensitivity"] for entry in tight["layers"])
    assert max(entry["sensitivity"] for entry in floats) == worst


def test_quantized_module_stays_trainable():
    model, inputs = _residual()
    gm = _compile(model, inputs).module
    gm.train()
    x = torch.randn(8, 1, 3, 12, 12)  # the graph was captured at batch 1 (a guard checks it)
    target = torch.randint(0, 5, (8, 1))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = sum(nn.functional.cross_entropy(gm(xi), ti) for xi, ti in zip(x, target)) / len(x)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    assert losses[-1] < losses[0]
    assert any(QUANT_META in n.meta for n in gm.graph.nodes)


def test_int8_preset_runs_default_passes_first_and_reports_layers():
    model, inputs = _residual()
    result = fxcompress.compile(model, inputs, "int8", calibration=_calibration())
    names = [r.name for r in result.report.records]
    assert "default/fold-batchnorm" in names
    assert names[-3:] == ["equalize-layers", "quantize-int8", "correct-bias"]  # bias correction last
    assert _targets(result.module)[aten.batch_norm.default] == 0
    assert result.recipe.tolerance >= result.report.drift
