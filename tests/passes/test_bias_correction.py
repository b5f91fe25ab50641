"""correct-bias: empirical bias correction after quantize-int8."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.capture import capture
from fxcompress.errors import InputError
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import NOT_QUANTIZED
from fxcompress.infra.registry import create_pass
from fxcompress.graph_meta import BIAS_CORRECTED as CORRECTED
from fxcompress.passes.presets import int8
from fxcompress.rewrite import weighted_layer
from fxcompress.rewrite.matchers import attribute
from tests.passes.test_equalize import Separable, _inputs

aten = torch.ops.aten
FAKE_QUANT = {aten.fake_quantize_per_tensor_affine.default, aten.fake_quantize_per_channel_affine.default}


def _quantized(model, inputs, calibration):
    """The model after default + quantize-int8 (no correction), and a context with the calibration."""
    recipe = int8()
    recipe.steps = [s for s in recipe.steps if getattr(s, "name", None) not in ("correct-bias", "equalize-layers")]
    result = fxcompress.compile(model, inputs, recipe, calibration=calibration, tolerance=float("inf"))
    return result.module, CompileContext(inputs, lambda: iter(calibration))


def _run(gm, context, **options):
    pass_ = create_pass("correct-bias", options)
    pass_.bind(context)
    result = pass_(gm)
    if result.modified:
        result.graph_module.recompile()
    return result


def _float_copy_output(gm, x, layer_node):
    """``layer_node``'s output in ``gm`` with every fake-quant as identity, and as quantized."""
    values = {}

    class Probe(torch.fx.Interpreter):
        def __init__(self, module, skip_quant):
            super().__init__(module)
            self.skip_quant = skip_quant

        def run_node(self, n):
            if self.skip_quant and n.op == "call_function" and n.target in FAKE_QUANT:
                return self.env[n.args[0]] if n.args[0].op != "get_attr" else self.fetch_attr(n.args[0].target)
            out = super().run_node(n)
            if n is layer_node:
                values[self.skip_quant] = out
            return out

    with torch.no_grad():
        Probe(gm, True).run(*x)
        Probe(gm, False).run(*x)
    return values[True], values[False]


@pytest.fixture
def uneven():
    torch.manual_seed(0)
    model = Separable(spread=2.5).eval()
    inputs = _inputs(1, 16)
    calibration = [_inputs(1, 16, seed=s) for s in range(16)]
    return model, inputs, calibration


FULL = {"significance": 0.0, "max_relative_shift": None}  # every layer's mean error, in full


def test_structure_only_biases_change_and_second_run_is_a_no_op(uneven):
    model, inputs, calibration = uneven
    gm, context = _quantized(model, inputs, calibration)
    ops_before = [(n.op, n.target) for n in gm.graph.nodes if n.op != "get_attr"]
    weights_before = {n.name: n.args[1] for n in gm.graph.nodes if weighted_layer(n) is not None}
    result = _run(gm, context, **FULL)
    layers = [n for n in gm.graph.nodes if weighted_layer(n) is not None]
    assert result.modified and result.stats["corrected"] == 4  # stem, depthwise, pointwise, project
    assert result.stats["skipped"] == 1  # the head sees one value per channel per batch: too few
    assert any("min_samples" in r.reason for r in result.rejections)
    assert [(n.op, n.target) for n in gm.graph.nodes if n.op != "get_attr"] == ops_before
    assert all(n.args[1] is weights_before[n.name] for n in layers)  # weights (their fake-quant) untouched
    assert sum(CORRECTED in n.meta for n in layers) == 4
    again = _run(gm, context, **FULL)
    assert not again.modified and again.stats["corrected"] == 0  # the head is still skipped, the rest done


def test_default_options_are_idempotent_too(uneven):
    model, inputs, calibration = uneven
    gm, context = _quantized(model, inputs, calibration)
    first = _run(gm, context)
    assert first.modified and first.stats["corrected"] >= 2
    again = _run(gm, context)  # a layer left alone the first time is judged the same way again
    assert not again.modified and again.stats["corrected"] == 0


def _stem_mean_errors(model, inputs, calibration, **options):
    """The stem's per-channel mean error on the calibration data before and after correct-bias."""
    gm, context = _quantized(model, inputs, calibration)
    stem = next(n for n in gm.graph.nodes if weighted_layer(n) is not None)
    # The float reference comes from the graph before correction (the correction moves both modes).
    reference = [_float_copy_output(gm, x, stem)[0] for x in calibration]

    def mean_error():
        errors = [_float_copy_output(gm, x, stem)[1] - ref for x, ref in zip(calibration, reference)]
        return torch.stack([e.mean(dim=(0, 2, 3)) for e in errors]).mean(0).abs()

    before = mean_error()
    _run(gm, context, **options)
    return before, mean_error()


def test_the_mean_error_of_a_corrected_layer_vanishes_on_the_calibration_data_without_shrinkage(uneven):
    before, after = _stem_mean_errors(*uneven, **FULL)
    print(f"stem's largest per-channel mean error: {float(before.max()):.2e} -> {float(after.max()):.2e}")
    assert float(before.max()) > 1e-5 and float(after.max()) < 1e-3 * float(before.max())


def test_shrinkage_corrects_significant_channels_and_leaves_noise_alone(uneven):
    before, after = _stem_mean_errors(*uneven, significance=1.0, max_relative_shift=None)
    changed = (after - before).abs() > 1e-3 * before
    print(f"stem: {int(changed.sum())} of {len(before)} channels corrected; mean errors {before} -> {after}")
    assert bool((after <= before * (1 + 1e-4) + 1e-9).all())  # no channel moves away from its float mean
    assert 0 < int(changed.sum()) < len(before)  # at one standard error: the stem's rounding errors are mostly noise over 16 images


def test_bias_correction_reduces_int8_drift_on_held_out_data(uneven):
    model, inputs, calibration = uneven
    without = int8()
    without.steps = [s for s in without.steps if getattr(s, "name", None) not in ("correct-bias", "equalize-layers")]
    with_bc = int8()
    with_bc.steps = [s for s in with_bc.steps if getattr(s, "name", None) != "equalize-layers"]
    held_out = [_inputs(1, 16, seed=100 + s) for s in range(8)]

    def error(recipe):
        module = fxcompress.compile(model, inputs, recipe, calibration=calibration, tolerance=float("inf")).module
        with torch.no_grad():
            return sum(float((module(*x) - model(*x)).pow(2).mean()) for x in held_out) / len(held_out)

    plain, corrected = error(without), error(with_bc)
    print(f"held-out int8 mean squared error: {plain:.3e} without bias correction, {corrected:.3e} with")
    assert corrected < plain


def test_a_float_graph_is_left_alone():
    model = Separable().eval()
    gm = capture(model, _inputs())
    result = _run(gm, CompileContext(_inputs()))
    assert not result.modified and result.stats == {"skipped_graph": NOT_QUANTIZED}


def test_missing_calibration_data_is_an_input_error(uneven):
    model, inputs, calibration = uneven
    gm, _ = _quantized(model, inputs, calibration)
    with pytest.raises(InputError, match="needs calibration data"):
        _run(gm, CompileContext(inputs))


class _PooledConv(torch.nn.Module):
    """A conv read through a global average: the output error is the conv's per-image mean error."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def _held_out_error(model, calibration, held_out, significance):
    from fxcompress.infra.recipe import PassStep, Recipe

    steps = [PassStep("quantize-int8")]
    if significance is not None:
        steps.append(PassStep("correct-bias", {"significance": significance}))
    module = fxcompress.compile(model, calibration[0], Recipe(name="q", steps=steps), calibration=calibration,
                                tolerance=float("inf")).module
    with torch.no_grad():
        return sum(float((module(*x) - model(*x)).pow(2).mean()) for x in held_out) / len(held_out)


def test_significance_keeps_noise_from_few_calibration_images_out_of_the_biases():
    # Zero-mean inputs: the quantization error of this conv has no mean, only noise from image to
    # image. A full correction from 4 images subtracts that noise and makes held-out data worse;
    # the significance test leaves (almost all of) it out.
    ratios = {0.0: [], None: []}
    for seed in range(6):
        torch.manual_seed(seed)
        model = _PooledConv().eval()
        calibration = [_inputs(1, 16, seed=1000 * seed + s) for s in range(4)]
        held_out = [_inputs(1, 16, seed=50_000 + s) for s in range(24)]
        plain = _held_out_error(model, calibration, held_out, None)
        ratios[0.0].append(_held_out_error(model, calibration, held_out, 0.0) / plain)
        default = create_pass("correct-bias").options.significance
        ratios[None].append(_held_out_error(model, calibration, held_out, default) / plain)
    full, tested = (sum(r) / len(r) for r in ratios.values())
    print(f"held-out error vs no correction: full means {full:.3f}x, significance test {tested:.3f}x ({ratios})")
    assert full > 1.05  # the case the test is about: correcting noise hurts
    assert tested < 1.01 and tested < full


def test_negative_significance_is_a_recipe_error():
    from fxcompress.errors import RecipeError

    with pytest.raises(RecipeError, match="significance must be >= 0"):
        create_pass("correct-bias", {"significance": -1.0})


def _biases(gm):
    out = []
    for node in gm.graph.nodes:
        layer = weighted_layer(node)
        if layer is not None and isinstance(layer.bias, torch.fx.Node):
            out.append(attribute(gm, layer.bias.target).detach().clone())
    return out


def test_float_means_recorded_by_quantize_int8_give_the_same_correction_as_a_float_pass(uneven):
    """quantize-int8 records each layer's float channel means in its own pass over the calibration data;
    correct-bias uses them (no float pass of its own) and corrects exactly as its own float pass would."""
    import copy

    model, inputs, calibration = uneven
    recipe = int8()
    recipe.steps = [s for s in recipe.steps
                    if getattr(s, "name", None) not in ("quantize-int8", "correct-bias", "equalize-layers")]
    prepared = fxcompress.compile(model, inputs, recipe, calibration=calibration).module
    context = CompileContext(inputs, lambda: iter(calibration))
    quantize = create_pass("quantize-int8")
    quantize.bind(context)
    gm = quantize(prepared).graph_module
    own_gm = copy.deepcopy(gm)  # new weight tensors: what was recorded no longer describes this graph
    reused = _run(gm, context, **FULL)
    own = _run(own_gm, context, **FULL)
    assert reused.stats["float_means"] == "recorded by quantize-int8", reused.stats
    assert own.stats["float_means"] == "own float pass", own.stats
    assert reused.stats["corrected"] == own.stats["corrected"] == 4
    for a, b in zip(_biases(gm), _biases(own_gm), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_int8_preset_runs_one_float_pass_over_the_calibration_data(uneven):
    model, inputs, calibration = uneven
    result = fxcompress.compile(model, inputs, "int8", calibration=calibration, tolerance=float("inf"))
    record = next(r for r in result.report.records if r.name == "correct-bias")
    assert record.stats["float_means"] == "recorded by quantize-int8", record.stats
