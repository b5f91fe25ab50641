"""Named pipelines users pick with ``recipe="<name>"`` or ``--recipe <name>``.

Each preset is a function returning a fresh Recipe, so callers may edit what they get.
"""

from __future__ import annotations

from fxcompress.fidelity import Gate
from fxcompress.infra.recipe import PassStep, Recipe
from fxcompress.infra.registry import PRESETS, register_preset


def default() -> Recipe:
    """Lossless cleanup: outputs within fp32 noise, never more nodes."""
    return Recipe(
        name="default",
        description="lossless: remove guards, fuse linear chains, fold constants and batch norms, merge parallel conv "
                    "branches, simplify algebra and reshapes, remove no-ops, zero branches, fuse RMS norms, fold repeated KV "
                    "heads, common subexpressions and dead code",
        steps=[
            # fuse-linear-chains first: it reads ``t(weight)`` as linear's weight, which fold-constants would copy
            PassStep("remove-guards"), PassStep("fuse-linear-chains"), PassStep("fold-constants"),
            PassStep("simplify-algebra"), PassStep("fold-batchnorm"),
            PassStep("merge-parallel-convs"),  # after fold-batchnorm: each branch is then a plain conv
            PassStep("collapse-reshapes"),
            PassStep("remove-no-ops"),
            PassStep("remove-zero-branches"),
            # one node per norm / attention where ONNX has one (opset 23: RMSNormalization, Attention)
            PassStep("fuse-rms-norm"), PassStep("fold-repeat-kv"),
            PassStep("eliminate-common-subexpressions"),
            PassStep("eliminate-dead-code"),
            PassStep("mark-fused-activations"),  # last: annotates the final graph, changes no node
        ],
        max_iterations=3,
    )


def _renamed(recipe: Recipe, name: str) -> Recipe:
    recipe.name = name
    return recipe


def _after_default(name: str, description: str, *steps: PassStep, gate: Gate) -> Recipe:
    # The default passes run nested (to their own fixed point) and strictly before the lossy
    # pass: repeating cleanup after quantization could constant-fold the fake-quantized weights.
    return Recipe(name=name, description=description, tolerance=gate.drift, rel_rms=gate.rel_rms, min_cosine=gate.cosine,
                  max_iterations=1, steps=[default(), *steps])


# Acceptance bounds of the lossy presets, per output (masked where a mask applies): relative RMS
# error and cosine decide (what the user's task metric follows); the max-error drift stays a loose
# guard against one wildly wrong element. Calibrated on real trained networks (docs/fidelity.md):
# the sentence encoder all-MiniLM-L6-v2 (padded batch 32x32), last_hidden_state masked:
#   fxcompress int8-dynamic   rel. RMS 0.147, cosine 0.989, drift 0.087 (sentence-embedding cosine min 0.983)
#   ORT quantize_dynamic      rel. RMS 0.302, cosine 0.954, drift 0.157 (0.937): the peer must pass
#   a broken result           cosine 0.8 means rel. RMS >= 0.6: refused by both bounds
# and the CRAFT text detector (VGG16-BN U-Net, int8 against ORT quantize_static), see docs/fidelity.md.
INT8_GATE = Gate(drift=0.5, rel_rms=0.4, cosine=0.92)
INT8_DYNAMIC_GATE = Gate(drift=0.5, rel_rms=0.4, cosine=0.92)
#: fp16 rounds at 2^-11 relative: a correct result is far inside these
FP16_GATE = Gate(drift=0.05, rel_rms=0.05, cosine=0.995)
#: Weight-only: int4 GPTQ on a random-init tiny Llama drifts about 0.09 (rel. RMS ~0.05), int8 about 0.01
INT4_WEIGHTS_GATE = Gate(drift=0.5, rel_rms=0.4, cosine=0.92)
INT8_WEIGHTS_GATE = Gate(drift=0.2, rel_rms=0.2, cosine=0.98)
#: The drift bounds (kept as names: recipes and tests read them)
INT8_TOLERANCE = INT8_GATE.drift
FP16_TOLERANCE = FP16_GATE.drift
INT4_WEIGHTS_TOLERANCE = INT4_WEIGHTS_GATE.drift
INT8_WEIGHTS_TOLERANCE = INT8_WEIGHTS_GATE.drift


#: The int8 preset's steps after ``default()``, one per line so additions merge cleanly.
#: conv-space-to-depth: ORT's int8 kernels run a 3-channel stem conv several times slower per
#: multiply-add than the rest of the network; the rewrite is exact and only pays off in int8.
#: smooth-activations and equalize-layers (both exact) balance per-channel ranges before calibration; correct-bias removes
#: the mean output error quantization leaves in each layer (depthwise networks need both).
INT8_STEPS: tuple[str, ...] = (
    "conv-space-to-depth",
    "smooth-activations",  # transformers: LayerNorm-output outliers moved into the next linears' weights
    "equalize-layers",
    "quantize-int8",
    "correct-bias",
)


def int8() -> Recipe:
    """Static int8 (calibrated): default passes, smoothing, equalization, quantize-int8, bias correction."""
    return _after_default("int8", "default, stem convs as space-to-depth, activation smoothing (transformers), cross-layer "
                          "equalization (CNNs), calibrated static int8 (U8S8 Q/DQ), bias correction",
                          *(PassStep(name) for name in INT8_STEPS), gate=INT8_GATE)


def int8_dynamic() -> Recipe:
    """Dynamic int8 for linear layers (transformer encoders); needs no calibration (smooths activations if given some)."""
    # equalize-attention after smoothing (which rescales the weights' columns, so the rows' ranges): query and
    # value rows balanced so those layers take one weight scale and export without a per-column Mul.
    return _after_default("int8-dynamic", "default, activation smoothing when calibration data is given, query/value "
                          "rows equalized against key/output projection, then dynamic int8 linear layers",
                          PassStep("smooth-activations", {"without_calibration": "skip"}), PassStep("equalize-attention"),
                          PassStep("quantize-int8-dynamic"), gate=INT8_DYNAMIC_GATE)


def int4_weights() -> Recipe:
    """int4 block-wise weights (GPTQ on the calibration data, round-to-nearest without), float activations."""
    return _after_default("int4-weights", "default, then 4-bit block-wise weights (GPTQ when calibration data is given) "
                          "exported as MatMulNBits / GatherBlockQuantized",
                          PassStep("quantize-weights", {"bits": 4, "method": "gptq", "without_calibration": "rtn"}),
                          gate=INT4_WEIGHTS_GATE)


def int8_weights() -> Recipe:
    """int8 block-wise weights (round-to-nearest), float activations."""
    return _after_default("int8-weights", "default, then 8-bit block-wise weights exported as MatMulNBits / GatherBlockQuantized",
                          PassStep("quantize-weights", {"bits": 8}), gate=INT8_WEIGHTS_GATE)


def fp16() -> Recipe:
    """Half precision weights and compute, fp32 softmax/normalization/reductions and I/O."""
    return _after_default("fp16", "default, then fp16 compute and weights", PassStep("convert-fp16"), gate=FP16_GATE)


def prune() -> Recipe:
    """Structured pruning (half the channels of every prunable group), between lossless cleanups.

    Lossy by design: accuracy is recovered by fine-tuning ``result.module``, so the tolerance is
    unbounded (the report still shows the drift); ONNX parity is checked against the pruned module.
    """
    return Recipe(name="prune", description="default, prune-channels (ratio 0.5), default again",
                  tolerance=float("inf"), max_iterations=1,
                  steps=[default(), PassStep("prune-channels"), _renamed(default(), "cleanup")])


def _sparse(name: str, description: str, step: PassStep) -> Recipe:
    # Cleanup only before: the mask multiply must stay in the graph so fine-tuning keeps it.
    return Recipe(name=name, description=description, tolerance=float("inf"), max_iterations=1,
                  steps=[default(), step])


def sparse_24() -> Recipe:
    """2:4 semi-structured magnitude sparsity of conv/linear weights (masks kept for fine-tuning)."""
    return _sparse("sparse-2:4", "default, then 2:4 masks on conv/linear weights", PassStep("sparsify-2:4"))


def sparse() -> Recipe:
    """Unstructured global magnitude sparsity (50% by default; option ``sparsity``)."""
    return _sparse("sparse", "default, then unstructured magnitude masks", PassStep("sparsify-magnitude"))


for _name, _factory in {"default": default, "int8": int8, "int8-dynamic": int8_dynamic, "fp16": fp16,
                         "int4-weights": int4_weights, "int8-weights": int8_weights,
                         "prune": prune, "sparse-2:4": sparse_24, "sparse": sparse}.items():
    register_preset(_name, _factory)

__all__ = ["PRESETS", "default", "fp16", "int4_weights", "int8", "int8_dynamic", "int8_weights", "prune", "sparse", "sparse_24"]
