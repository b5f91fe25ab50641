"""equalize-layers: exact cross-layer equalization of conv/linear pairs, gates, bias absorption, rejections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.infra.context import CompileContext
from fxcompress.infra.registry import create_pass
from fxcompress.graph_meta import GATE_SCALE
from fxcompress.passes.presets import int8
from fxcompress.rewrite import weighted_layer
from tests.passes.helpers import run_pass

aten = torch.ops.aten


def _uneven(conv: nn.Conv2d, spread: float, seed: int) -> None:
    """Scale output channels by factors spanning ``exp(+-spread)``: what a folded batch norm leaves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        factors = torch.exp(torch.randn(conv.out_channels, generator=g) * spread)
        conv.weight.mul_(factors.reshape(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.mul_(factors)


class Separable(nn.Module):
    """stem conv -> relu -> depthwise -> relu -> pointwise -> (nothing) -> 1x1 conv -> head.

    ``spread`` makes the per-channel ranges uneven, as in a trained MobileNet after BN folding.
    """

    def __init__(self, channels: int = 16, spread: float = 0.0, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.act1 = activation()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.act2 = activation()
        self.pointwise = nn.Conv2d(channels, channels * 2, 1)
        self.project = nn.Conv2d(channels * 2, channels, 1)
        self.head = nn.Linear(channels, 10)
        if spread:
            for i, conv in enumerate((self.stem, self.depthwise, self.pointwise)):
                _uneven(conv, spread, seed=i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.pointwise(self.act2(self.depthwise(self.act1(self.stem(x))))))
        return self.head(y.mean((2, 3)))


class Gated(nn.Module):
    """depthwise -> SiLU -> squeeze-excitation gate -> 1x1 projection (EfficientNet's block)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, channels, 1)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.gate = nn.Conv2d(4, channels, 1)
        self.project = nn.Conv2d(channels, 8, 1)
        _uneven(self.depthwise, 1.5, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.depthwise(nn.functional.silu(self.expand(x))))
        s = torch.sigmoid(self.gate(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.project(y * s)


def _inputs(n: int = 2, size: int = 12, seed: int = 0):
    return (torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("spread", [0.0, 2.0])
def test_equalization_is_exact_in_fp32_and_idempotent(spread):
    torch.manual_seed(0)
    model = Separable(spread=spread).eval()
    inputs = _inputs()
    with torch.no_grad():
        reference = model(*inputs)
    gm = capture(model, inputs)
    result = run_pass("equalize-layers", gm)
    # stem -> relu -> depthwise, depthwise -> relu -> pointwise, pointwise -> project (identity)
    assert result.stats["pairs"] == 3
    assert result.modified and result.stats["layers_rescaled"] == 4
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs), reference, rtol=1e-4, atol=1e-5)
        other = _inputs(seed=1)  # exact for every input, not just the example
        torch.testing.assert_close(result.graph_module(*other), model(*other), rtol=1e-4, atol=1e-5)


def test_equalization_balances_the_ranges_of_each_pair():
    torch.manual_seed(0)
    model = Separable(spread=2.0).eval()
    inputs = _inputs()
    gm = capture(model, inputs)
    stem = model.stem.weight.detach().abs().reshape(16, -1).amax(1)
    before = float(stem.max() / stem.min())
    result = run_pass("equalize-layers", gm, absorb_bias=False)
    # After equalization the stem's output channel i and the depthwise's channel i span the same range.
    layers = [weighted_layer(n) for n in result.graph_module.graph.nodes if weighted_layer(n) is not None]
    weights = [result.graph_module.get_parameter(str(layer.weight.target)) for layer in layers]
    stem_r = weights[0].detach().abs().reshape(16, -1).amax(1)
    dw_r = weights[1].detach().abs().reshape(16, -1).amax(1)
    pw_in = weights[2].detach().abs().amax(dim=(0, 2, 3))
    # The chain is balanced to a fixed point: each tensor's two sides agree within min_scale_change.
    assert torch.allclose(stem_r, dw_r, rtol=0.05) or torch.allclose(dw_r, pw_in, rtol=0.05)
    assert float(stem_r.max() / stem_r.min()) < before


def test_bias_absorption_moves_the_bias_only_across_unpadded_identity_pairs():
    torch.manual_seed(0)
    model = Separable(spread=1.0).eval()
    inputs = _inputs()
    gm = capture(model, inputs)
    result = run_pass("equalize-layers", gm)
    assert result.stats["biases_absorbed"] == 1  # pointwise -> project only (the others have a ReLU)
    pointwise = [weighted_layer(n) for n in result.graph_module.graph.nodes if weighted_layer(n) is not None][2]
    assert not bool(result.graph_module.get_parameter(str(pointwise.bias.target)).any())
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation, words", [
    (nn.ReLU6, "clips at a fixed value"), (nn.Hardswish, "hardswish is not scale-equivariant"),
    (nn.SiLU, "SiLU is not scale-equivariant"),
])
def test_non_homogeneous_activations_are_rejected_with_the_reason(activation, words):
    torch.manual_seed(0)
    model = Separable(spread=1.0, activation=activation).eval()
    gm = capture(model, _inputs())
    result = create_pass("equalize-layers", {})(gm)
    reasons = [r.reason for r in result.rejections]
    assert sum(words in r for r in reasons) == 2, reasons
    assert result.stats["pairs"] == 1  # only pointwise -> project remains


def test_a_residual_reader_blocks_the_pair():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.relu(y)) + y

    gm = capture(Residual().eval(), _inputs())
    result = create_pass("equalize-layers", {})(gm)
    assert not result.modified
    assert any("also used by" in r.reason for r in result.rejections)


@pytest.mark.parametrize("ranges", ["weights", "calibration"])
def test_squeeze_excitation_gate_carries_the_scale_exactly(ranges):
    torch.manual_seed(0)
    model = Gated().eval()
    inputs = _inputs()
    gm = capture(model, inputs)
    pass_ = create_pass("equalize-layers", {"ranges": ranges})
    calibration = [_inputs(seed=s) for s in range(4)]
    pass_.bind(CompileContext(inputs, lambda: iter(calibration)))
    result = pass_(gm)
    assert result.modified and result.stats["gates_scaled"] == 1
    gm = result.graph_module
    gm.recompile()
    assert sum(GATE_SCALE in n.meta for n in gm.graph.nodes) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    again = create_pass("equalize-layers", {"ranges": ranges})
    again.bind(CompileContext(inputs, lambda: iter(calibration)))
    second = again(gm)
    assert not second.modified, second.stats  # the earlier gate scale is reused, not stacked
    assert sum(GATE_SCALE in n.meta for n in gm.graph.nodes) == 1


def test_int8_preset_runs_equalization_and_bias_correction():
    names = [getattr(s, "name", None) for s in int8().steps]
    assert names[-3:] == ["equalize-layers", "quantize-int8", "correct-bias"]


def test_equalization_reduces_int8_error_on_uneven_relu_network():
    """Drift under static int8 with and without equalization, on one model with uneven channel ranges."""
    torch.manual_seed(0)
    model = Separable(spread=2.5).eval()
    inputs = _inputs(1, 16)
    calibration = [_inputs(1, 16, seed=s) for s in range(16)]
    plain = int8()
    plain.steps = [s for s in plain.steps if getattr(s, "name", None) not in ("equalize-layers", "correct-bias")]
    equalized = int8()
    equalized.steps = [s for s in equalized.steps if getattr(s, "name", None) != "correct-bias"]
    drift_plain = fxcompress.compile(model, inputs, plain, calibration=calibration, tolerance=float("inf")).report.drift
    drift_eq = fxcompress.compile(model, inputs, equalized, calibration=calibration, tolerance=float("inf")).report.drift
    print(f"int8 drift: without equalization {drift_plain:.4f}, with {drift_eq:.4f}")
    assert drift_eq < 0.7 * drift_plain
