"""smooth-activations: structure, exactness in fp32, idempotence, rejection reasons, int8 with outliers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.errors import InputError, RecipeError
from fxcompress.infra.context import CompileContext
from fxcompress.passes.smooth_quant import SmoothActivationsPass, smoothing_factors
from tests.models import Residual

aten = torch.ops.aten


class PreLN(nn.Module):
    """LayerNorm read by two linear layers (q/k style), then a LayerNorm read by a linear and an add."""

    def __init__(self, width: int = 16, outlier: float = 40.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, 8)
        self.norm2 = nn.LayerNorm(width)
        self.c = nn.Linear(width, width)
        with torch.no_grad():  # trained-transformer style: two channels of the LayerNorm output 40x larger
            self.norm.weight[[2, 5]] = outlier
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = self.norm(x)
        h = self.a(y) + x
        z = self.norm2(h)
        return torch.cat([self.b(y), self.c(z) + z], dim=-1)


def _inputs(seed: int = 0, n: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 6, 16, generator=g),) for _ in range(n)]


def _run(gm, inputs, calibration, **options):
    smooth = SmoothActivationsPass(options)
    smooth.bind(CompileContext(inputs, lambda: iter(calibration)))
    return smooth(gm)


def _captured(model, inputs):
    return capture(model.eval(), inputs)


def test_structure_scales_layernorm_and_reading_linears_only():
    torch.manual_seed(0)
    model = PreLN()
    inputs = _inputs()[0]
    gm = _captured(model, inputs)
    result = _run(gm, inputs, _inputs(1, 4))
    assert result.modified
    (entry,) = result.stats["smoothed"]
    assert entry["name"] == "norm" and sorted(entry["linears"]) == ["a", "b"]
    assert entry["outlier_ratio_before"] > 10 and entry["outlier_ratio_after"] < entry["outlier_ratio_before"] / 3
    # norm2 is read by a linear and by an add: left alone, with the reason.
    (rejection,) = result.rejections
    assert "not a linear layer" in rejection.reason and "add" in rejection.reason
    gm = result.graph_module
    norms = [n for n in gm.graph.nodes if n.target is aten.layer_norm.default]
    gamma = gm.get_parameter(str(norms[0].args[2].target))
    assert gamma[2] < 40 and gamma[5] < 40  # the outliers moved out of the activation
    assert torch.equal(gm.get_parameter(str(norms[1].args[2].target)), model.norm2.weight)  # untouched
    # no node was inserted: the factors live in the parameters
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function") == sum(
        1 for n in _captured(PreLN(), inputs).graph.nodes if n.op == "call_function")


def test_exact_in_fp32_and_the_user_model_is_untouched():
    torch.manual_seed(0)
    model = PreLN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _inputs()[0]
    reference = model(*inputs)
    result = fxcompress.compile(model, inputs, ["smooth-activations"], calibration=_inputs(1, 4))
    out = result.module(*inputs)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_second_run_changes_nothing(alpha):
    torch.manual_seed(0)
    inputs = _inputs()[0]
    calibration = _inputs(1, 4)
    gm = _captured(PreLN(), inputs)
    first = _run(gm, inputs, calibration, alpha=alpha)
    second = _run(first.graph_module, inputs, calibration, alpha=alpha)
    assert first.modified and not second.modified, second.stats


def test_factors_follow_the_formula_and_leave_dead_channels_alone():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(act, weight, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(smoothing_factors(act[:2], weight[:2], 1.0), act[:2])


def test_cnn_without_layernorm_is_a_no_op_and_needs_no_calibration():
    torch.manual_seed(0)
    inputs = (torch.randn(1, 3, 12, 12),)
    gm = _captured(Residual(), inputs)
    result = SmoothActivationsPass()(gm)  # unbound: no calibration at all
    assert not result.modified and result.stats["smoothed"] == []


def test_calibration_is_required_when_there_is_something_to_smooth():
    gm = _captured(PreLN(), _inputs()[0])
    with pytest.raises(InputError, match="needs calibration data"):
        SmoothActivationsPass()(gm)


def test_bad_alpha_is_a_recipe_error():
    with pytest.raises(RecipeError, match="alpha must be in"):
        SmoothActivationsPass(alpha=1.5)


def test_layernorm_without_affine_and_shared_weights_are_rejected_with_reasons():
    class NoAffine(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16, elementwise_affine=False)
            self.fc = nn.Linear(16, 16)
            self.norm2 = nn.LayerNorm(16)

        def forward(self, x):
            return self.fc(self.norm(x)) + self.fc(self.norm2(x))  # fc's weight read twice

    inputs = _inputs()[0]
    result = _run(_captured(NoAffine(), inputs), inputs, _inputs(1, 2))
    assert not result.modified
    reasons = " | ".join(r.reason for r in result.rejections)
    assert "no constant weight" in reasons and "also read by" in reasons


def test_static_int8_with_outlier_channels_needs_smoothing():
    torch.manual_seed(0)
    model = PreLN(outlier=60.0).eval()
    inputs = _inputs()[0]
    calibration = _inputs(1, 8)
    test = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(9))
    reference = model(test[:2])

    def error(steps):
        result = fxcompress.compile(model, inputs, steps, calibration=calibration, tolerance=10.0)
        return float((result.module(test[:2]) - reference).pow(2).mean().sqrt())

    plain = error(["quantize-int8"])
    smoothed = error(["smooth-activations", "quantize-int8"])
    assert smoothed < 0.8 * plain, (plain, smoothed)


def test_int8_dynamic_smooths_only_when_given_calibration_data():
    torch.manual_seed(0)
    model = PreLN(outlier=60.0).eval()
    inputs = _inputs()[0]
    test = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(9))
    reference = model(test)
    errors = {}
    for label, calibration in (("none", None), ("given", _inputs(1, 8))):
        result = fxcompress.compile(model, inputs, "int8-dynamic", calibration=calibration, tolerance=10.0)
        record = next(r for r in result.report.records if r.name == "smooth-activations")
        assert bool(record.stats["smoothed"]) == (calibration is not None)
        if calibration is None:
            assert "no calibration data" in record.stats["skipped"]
        errors[label] = float((result.module(test) - reference).pow(2).mean().sqrt())
    assert errors["given"] < 0.8 * errors["none"], errors
