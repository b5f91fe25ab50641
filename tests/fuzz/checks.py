"""The differential checks run on generated models (and on the saved regression cases).

Each check builds the model from its spec, runs something from fxcompress on it, and raises
AssertionError naming the pass/preset and what broke. Outputs are compared on the example inputs
*and* on fresh random inputs: a pass that bakes the example's values into the graph would pass
the built-in VerifyNumerics instrument (which only sees the example) but not this.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.errors import DriftError
from fxcompress.infra.context import CompileContext
from fxcompress.infra.manager import PassManager
from fxcompress.infra.registry import available_passes, create_pass
from fxcompress.numerics import LOSSLESS_TOLERANCE, compare_outputs, flatten_outputs, signature, worst_drift
from fxcompress.passes.presets import PRESETS
from tests.fuzz.grammar import ModelSpec, build_model


def model_digest(model: nn.Module) -> str:
    """A hash of everything a call must not change: every parameter and buffer (name, dtype,
    shape, bytes, requires_grad) and every submodule's training flag."""
    h = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{tensor.requires_grad}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    for name, module in model.named_modules():
        h.update(f"{name}:{module.training};".encode())
    return h.hexdigest()


def lossless_passes() -> list[str]:
    """Registered passes that declare themselves lossless (what the user sees in `fxcompress passes`)."""
    return [name for name, cls in available_passes().items() if cls.lossless]


def _preset_is_lossless(name: str) -> bool:
    recipe = PRESETS[name]()
    return recipe.tolerance <= LOSSLESS_TOLERANCE and all(step.build().lossless for step in recipe.steps)


def lossless_presets() -> list[str]:
    return [name for name in PRESETS if _preset_is_lossless(name)]


def lossy_presets() -> list[str]:
    return [name for name in PRESETS if not _preset_is_lossless(name)]


def fresh_inputs(inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed + 1)
    return tuple(torch.randn(t.shape, generator=generator) for t in inputs)


def _outputs(module: nn.Module, inputs) -> list:
    # Clones: generated models may write into their input (an in-place activation first), and
    # every run must see the same values.
    with torch.no_grad():
        return flatten_outputs(module(*(t.clone() for t in inputs)))


def assert_same_outputs(label: str, model: nn.Module, candidate: nn.Module, inputs, tolerance: float) -> float:
    """Signature identical and drift <= tolerance on ``inputs``; returns the drift."""
    want, got = _outputs(model, inputs), _outputs(candidate, inputs)
    assert signature(got) == signature(want), f"{label}: outputs changed from {signature(want)} to {signature(got)}"
    drift = worst_drift(compare_outputs(want, got))
    assert drift <= tolerance, f"{label}: drift {drift:.3e} > {tolerance:.0e}"
    return drift


class _MetaCheck(fx.Interpreter):
    """Runs the graph and lists nodes whose ``meta['val']`` disagrees with the real value."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.stale: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor):
            if tuple(val.shape) != tuple(out.shape) or val.dtype != out.dtype:
                self.stale.append(f"{n.name}: meta {val.dtype}{list(val.shape)} vs real {out.dtype}{list(out.shape)}")
        return out


def assert_meta_valid(label: str, module: fx.GraphModule, inputs) -> None:
    checker = _MetaCheck(module)
    with torch.no_grad():
        checker.run(*(t.clone() for t in inputs))
    assert not checker.stale, f"{label}: node.meta['val'] is stale: {checker.stale[:3]}"


def _run_pass(name: str, graph_module: fx.GraphModule, context: CompileContext):
    """One pass through a bare PassManager (lint + recompile, no rollback instrument to hide a bug)."""
    p = create_pass(name)
    p.bind(context)
    manager = PassManager([p])
    return manager(graph_module)


def check_lossless_passes(spec: ModelSpec, passes: list[str] | None = None) -> None:
    """Every lossless pass alone on the captured graph: numerics on example and fresh inputs,
    lint, output signature, valid meta, and idempotence (a second run changes nothing)."""
    model, inputs = build_model(spec)
    captured = capture(model, inputs)
    fresh = fresh_inputs(inputs, spec.seed)
    with torch.no_grad():
        # Data-driven lossless passes (smooth-activations, equalize-layers from observed ranges)
        # get calibration batches, as in a real compile.
        batches = calibration_for(inputs)
        context = CompileContext(inputs, lambda: iter(batches), model(*(t.clone() for t in inputs)))
    for name in lossless_passes() if passes is None else passes:
        work = copy.deepcopy(captured)
        result = _run_pass(name, work, context)
        out = result.graph_module
        out.graph.lint()
        for feed in (inputs, fresh):
            assert_same_outputs(f"pass '{name}'", model, out, feed, LOSSLESS_TOLERANCE)
        if result.modified:
            assert_meta_valid(f"pass '{name}'", out, inputs)
        again = _run_pass(name, out, context)
        assert not again.modified, f"pass '{name}' is not idempotent: a second run reported modified=True ({again.stats})"


def check_lossless_preset(spec: ModelSpec, preset: str = "default") -> fxcompress.CompileResult:
    """compile() with a lossless preset: nothing rolled back, outputs within fp32 noise on example
    and fresh inputs, the user's model untouched."""
    model, inputs = build_model(spec)
    digest = model_digest(model)
    result = fxcompress.compile(model, inputs, preset)
    assert model_digest(model) == digest, f"preset '{preset}' mutated the user's model"
    rolled = [(r.name, r.rolled_back) for r in result.report.rolled_back]
    assert not rolled, f"preset '{preset}': passes were rolled back on a valid model: {rolled}"
    assert result.report.drift <= LOSSLESS_TOLERANCE
    result.module.graph.lint()
    for feed in (inputs, fresh_inputs(inputs, spec.seed)):
        assert_same_outputs(f"preset '{preset}'", model, result.module, feed, LOSSLESS_TOLERANCE)
    return result


def calibration_for(inputs: tuple[torch.Tensor, ...], count: int = 4) -> list[tuple[torch.Tensor, ...]]:
    return [fresh_inputs(inputs, 100 + i) for i in range(count)]


def check_lossy_preset(spec: ModelSpec, preset: str) -> str:
    """compile() with a lossy preset: either a result within the preset's declared tolerance whose
    ONNX export validates in ORT, or a DriftError (the documented refusal). Returns which."""
    model, inputs = build_model(spec)
    digest = model_digest(model)
    tolerance = PRESETS[preset]().tolerance
    try:
        result = fxcompress.compile(model, inputs, preset, calibration_for(inputs))
    except DriftError:
        assert model_digest(model) == digest, f"preset '{preset}' mutated the user's model"
        return "refused"
    assert model_digest(model) == digest, f"preset '{preset}' mutated the user's model"
    assert result.report.drift <= tolerance, f"preset '{preset}': drift {result.report.drift:.2e} > {tolerance}"
    result.module.graph.lint()
    with tempfile.TemporaryDirectory() as tmp:
        result.export_onnx(Path(tmp) / "m.onnx")  # validates against result.module in ORT
    return "compiled"


def check_onnx(spec: ModelSpec, preset: str = "default") -> None:
    """The compiled model exports, matches the compiled module in ORT (export_onnx validates), and
    matches the *original* model in ORT (fxcompress.validate)."""
    model, inputs = build_model(spec)
    result = fxcompress.compile(model, inputs, preset)
    with tempfile.TemporaryDirectory() as tmp:
        path = result.export_onnx(Path(tmp) / "m.onnx")
        parity = fxcompress.validate(path, model, inputs, tolerance=max(LOSSLESS_TOLERANCE, result.recipe.tolerance))
        assert parity.passed, f"ONNX of preset '{preset}' vs the original model: {parity.to_text()}"
