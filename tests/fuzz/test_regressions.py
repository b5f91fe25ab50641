"""Saved cases for the differential checks, and proof that the checks can fail.

``CASES`` are explicit models (``ModelSpec`` literals, as hypothesis prints them): shrunk
failures from fuzz runs, each with the bug it found, and hand-picked corners of the grammar that
random draws reach rarely. Every case runs through every lossless pass, the lossless presets and
ONNX export. The ``test_checker_catches_*`` tests register deliberately broken passes and assert
the differential check rejects them — a check that cannot fail would prove nothing.
"""

from __future__ import annotations

import warnings
import pytest
import torch

from fxcompress.infra import registry
from fxcompress.infra.pass_base import Pass, PassResult
from tests.fuzz import checks
from tests.fuzz.grammar import ModelSpec, build_model

_CONV = {"out": 4, "k": 1, "stride": 1, "padding": 0, "groups": 1, "dilation": 1, "bias": True, "bn": None, "act": None,
         "inplace": False}

CASES = {
    # Corners: 1x1 spatial input, a 1x1 conv folded with a plain (non-affine) BN, in-place relu6.
    "1x1-spatial-plain-bn": ModelSpec((1, 1, 1, 1), (("conv", {**_CONV, "bn": "plain", "act": "relu6", "inplace": True}),)),
    # Depthwise conv + BN, then an in-place residual add over a grouped conv.
    "depthwise-inplace-residual": ModelSpec((2, 4, 5, 3), (
        ("conv", {**_CONV, "k": 3, "padding": 1, "groups": 4, "bias": False, "bn": "affine", "act": "hardswish"}),
        ("conv_residual", {"k": 3, "groups": 2, "act": "silu", "inplace_add": True}),
    ), seed=7),
    # A returned intermediate that a later in-place relu overwrites (eager aliasing semantics).
    "aliased-output-mutated-later": ModelSpec((1, 2, 4, 4), (
        ("conv", {**_CONV, "out": 3}),
        ("act", {"kind": "relu", "inplace": True}),
        ("noop", {"kind": "identity"}),
    ), output="tuple", seed=3),
    # Attention with one head per feature, then mean -> linear chain -> batch norm 1d.
    "attention-to-linear-chain": ModelSpec((2, 3, 4), (
        ("attention", {"impl": "torch", "heads": 4}),
        ("attention", {"impl": "hand", "heads": 2}),
        ("reshape", {"kind": "mean", "arg": (1,)}),
        ("linear_chain", {"mid": 5, "out": 3, "bias": False}),
        ("bn1d", {"affine": True}),
    ), output="dict", seed=11),
    # Algebraic identities: x*0+0.25 (a constant), a zero branch, a duplicated activation.
    "algebra-and-cse": ModelSpec((3, 6), (
        ("linear", {"out": 6, "bias": True, "act": None}),
        ("zero_branch", {"act": "sigmoid"}),
        ("duplicate", {"act": "gelu"}),
        ("scale", {"mul": 0.0, "add": 0.25}),
    ), seed=5),
    # Found by the first long fuzz run (a harness bug, kept as a case): in-place activations on
    # the graph input mutate the caller's tensor, so every comparison must run on clones.
    "inplace-activation-on-input": ModelSpec((3, 5), (
        ("act", {"kind": "silu", "inplace": True}),
        ("act", {"kind": "hardswish", "inplace": True}),
        ("zero_branch", {"act": "sigmoid"}),
    ), seed=965),
    # Found by the 2,000-example run (shrunk by hypothesis, pasted as printed): three linears in a
    # row. fuse-linear-chains fused one pair per run, so a second run changed the graph again (not
    # idempotent). Fixed: the pass now walks until nothing changes.
    "three-linear-chain": ModelSpec(input_shape=(1, 3), layers=(
        ("linear", {"out": 1, "bias": False, "act": None}),
        ("linear_chain", {"mid": 2, "out": 1, "bias": False}),
    ), output="tensor", seed=0),
    # Found by the 2,000-model run of the default preset (shrunk): x*0 feeding a non-affine BN and
    # an MLP residual. On the second iteration fold-constants raises KeyError 'folded_batch_norm'
    # (ConstantEvaluator.cone(), now in analysis/constant_eval.py: the node-order map is built
    # before the pass adds nodes), so compile() failed with a PassError on a valid model.
    "fold-constants-keyerror": ModelSpec(input_shape=(1, 1), layers=(
        ("scale", {"mul": 0.0, "add": 0.0}),
        ("bn1d", {"affine": False}),
        ("mlp_residual", {"hidden": 1, "act": "relu"}),
        ("act", {"kind": "relu", "inplace": True}),
    ), output="tensor", seed=0),
    # Reshape round trip between linears, a transposed image, and a stride-2 dilated conv.
    "reshapes-and-dilation": ModelSpec((1, 2, 7, 5), (
        ("conv", {**_CONV, "k": 3, "stride": 2, "padding": 1, "dilation": 2, "bn": "affine"}),
        ("reshape", {"kind": "transpose_hw"}),
        ("reshape", {"kind": "flatten"}),
        ("reshape", {"kind": "roundtrip", "arg": 4}),
        ("linear", {"out": 3, "bias": True, "act": "relu"}),
    ), seed=2),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_cases_build_and_run():
    for name, spec in CASES.items():
        model, inputs = build_model(spec)
        model(*inputs)


#: Cases that still fail, per check, with the reason; strict, so a fix shows up as XPASS and the
#: mark has to go.
OPEN_PASSES: dict[str, str] = {}
OPEN_PRESETS: dict[str, str] = {}


def _cases(open_cases: dict[str, str]) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=open_cases[n])) if n in open_cases else n
            for n in CASES]


@pytest.mark.parametrize("name", _cases(OPEN_PASSES))
def test_case_lossless_passes(name):
    checks.check_lossless_passes(CASES[name])


@pytest.mark.parametrize("name", _cases(OPEN_PRESETS))
@pytest.mark.parametrize("preset", checks.lossless_presets())
def test_case_lossless_presets(name, preset):
    checks.check_lossless_preset(CASES[name], preset)


@pytest.mark.parametrize("name", ["depthwise-inplace-residual", "aliased-output-mutated-later", "attention-to-linear-chain"])
def test_case_onnx(name):
    checks.check_onnx(CASES[name])


# --- the checker itself -------------------------------------------------------------------------

_SPEC = CASES["depthwise-inplace-residual"]


@pytest.fixture
def register(monkeypatch):
    """Register a test pass for the duration of one test."""

    def add(cls):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
        return cls.name

    return add


class NudgeWeights(Pass):
    """Claims lossless, adds 1e-3 to every weight."""

    name = "test-nudge-weights"

    def call(self, gm):
        for p in gm.parameters():
            p.data.add_(1e-3)
        return PassResult(gm, True)


class BakeExampleInput(Pass):
    """Replaces the graph input by the example input stored as a constant. The example's outputs
    stay exact (the built-in numerics instrument sees nothing); any other input exposes it."""

    name = "test-bake-example"

    def bind(self, context):
        self.example = context.example_inputs[0]

    def call(self, gm):
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        if "baked" in dict(gm.named_buffers()):
            return PassResult(gm, False)
        gm.register_buffer("baked", self.example.clone())
        with gm.graph.inserting_after(placeholder):
            const = gm.graph.get_attr("baked")
        for user in list(placeholder.users):
            if user is not const and user.op != "call_module":
                user.replace_input_with(placeholder, const)
        return PassResult(gm, True)


class AlwaysAddsClone(Pass):
    """Adds a clone before the output every time: never reaches a fixed point."""

    name = "test-always-adds"

    def call(self, gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        first = output.args[0][0]
        with gm.graph.inserting_before(output):
            clone = gm.graph.call_function(torch.ops.aten.clone.default, (first,))
        output.replace_input_with(first, clone)
        clone.meta["val"] = first.meta.get("val")
        return PassResult(gm, True)


class StaleMeta(Pass):
    """Changes a node's value without refreshing its meta['val'] (wrong shape recorded)."""

    name = "test-stale-meta"

    def call(self, gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor))
        if node.meta.get("stale"):
            return PassResult(gm, False)
        node.meta["val"] = node.meta["val"].new_empty((7, 7))
        node.meta["stale"] = True
        return PassResult(gm, True)


@pytest.mark.parametrize("cls, message", [
    (NudgeWeights, r"pass 'test-nudge-weights': drift"),
    (BakeExampleInput, r"pass 'test-bake-example': drift"),
    (AlwaysAddsClone, r"pass 'test-always-adds' is not idempotent"),
    (StaleMeta, r"pass 'test-stale-meta': node.meta\['val'\] is stale"),
])
def test_checker_catches_broken_passes(register, cls, message):
    name = register(cls)
    with pytest.raises(AssertionError, match=message):
        checks.check_lossless_passes(_SPEC, passes=[name])


def test_checker_catches_a_preset_that_rolls_back(monkeypatch, register):
    from fxcompress.infra.recipe import PassStep, Recipe
    from fxcompress.passes import presets

    register(NudgeWeights)
    monkeypatch.setitem(presets.PRESETS, "test-broken", lambda: Recipe("test-broken", [PassStep(NudgeWeights.name)]))
    with pytest.raises(AssertionError, match=r"rolled back on a valid model: \[\('test-nudge-weights'"):
        checks.check_lossless_preset(_SPEC, "test-broken")
