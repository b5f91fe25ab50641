"""Empirical bias correction after static int8: remove the mean output error of each quantized layer.

Quantizing a layer's weights and inputs changes its output by an error ``e = y_q - y`` whose mean
over the data is not zero: rounding errors of a depthwise filter with 9 taps, or of a per-tensor
activation scale that is coarse for a channel with a small range, do not average out within one
output channel. A shift of the mean is harmless once but compounds through a deep network
(Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019).
Subtracting ``E[e]`` from the layer's bias, channel by channel, removes it::

    b'_c = b_c - f_c * E[y_q - y]_c          (expectation over calibration data, batch and spatial positions)

The expectation is *empirical*. Since the mean of the error is the difference of the means, the
float model's per-sample channel means are needed: quantize-int8 records them in its own pass over
the calibration data (node meta ``FLOAT_CHANNEL_STATS``, with a key naming the graph and weights
they were measured on), so the data goes through the float model once per compile. Where they are
missing or stale (another pass ran in between, fewer batches), the float model (every fake-quant
an identity: quantize-int8 only inserts fake-quant nodes) is run once per batch as a compiled
graph that returns only each layer's per-sample channel means. The
quantized graph is then evaluated op by op with all batches in lockstep, and layers are corrected
in graph order: a correction adds a constant per channel, so the quantized values already computed
are shifted rather than recomputed, and each layer's correction sees the errors that remain after
its predecessors' corrections, as the exported model will.

**Significance.** With few calibration samples a channel's mean error can be mostly the noise of
those samples (one image differs from the next), and subtracting it makes new data worse. Each
channel's correction is therefore shrunk by how much of it is signal: with ``m`` the mean of the
per-sample mean errors over ``n`` samples (each batch item is one sample), ``se`` its standard
error and ``k = significance``, ``f = max(0, 1 - (k se / m)^2)``. With ``k = 1`` this is the
positive-part James-Stein factor (``(m^2 - se^2) / m^2`` estimates ``mu^2 / (mu^2 + se^2)``, the
factor that minimises the squared error left on new data); the default ``k = 2`` leaves alone a
channel within two standard errors of zero, because ``se`` itself is estimated from few samples
(measured on a conv read through a global average, 4 calibration images, zero-mean error: full
correction 1.10x the held-out error of none, ``k = 2`` 1.003x). ``significance=0`` applies every
mean in full.

**First-order regime.** Bias correction assumes the error is a small perturbation of the output.
On networks with per-channel gains spread over orders of magnitude (``uneven_bn``) a per-tensor
activation scale can collapse or clip a channel: its mean error is then consistent across images
(significant) but comparable to the channel's spread, and moving its mean moves it across the
activation and out of the next quantizer's range. A channel whose mean error exceeds
``max_relative_shift`` times its float standard deviation (over the calibration data, from the
same probe) is left alone.

Only conv and linear layers whose weights quantize-int8 quantized are corrected. A layer is
skipped (with the reason) when its bias is shared with another layer, when it sees fewer than
``min_samples`` values per channel (a mean over too few samples corrects noise), when fewer than
two samples leave the significance unknown, or when its output channels cannot be located. A
layer without a bias gets one. The pass needs the calibration data given to ``compile`` and
changes only biases, so the graph's structure stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.errors import RecipeError
from fxcompress.graph_meta import BIAS_CORRECTED, FLOAT_CHANNEL_STATS
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import DataDrivenPass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.passes.calibrators import float_stats_hold, sample_channel_means
from fxcompress.passes.quantize import QUANT_META, layer_name
from fxcompress.rewrite import RewriteContext, WeightedLayer, set_argument, weighted_layer

aten = torch.ops.aten

_FAKE_QUANT = {aten.fake_quantize_per_tensor_affine.default, aten.fake_quantize_per_channel_affine.default,
               aten.fake_quantize_per_tensor_affine.tensor_qparams}


def _is_fake_quant(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _FAKE_QUANT and QUANT_META in node.meta


def _quantized_layer(node: fx.Node) -> WeightedLayer | None:
    """``node`` as a conv/linear layer whose weight is fake-quantized by quantize-int8, else None."""
    layer = weighted_layer(node)
    if layer is None or layer.kind == "conv_transpose":
        return None
    weight = layer.weight
    return layer if isinstance(weight, fx.Node) and _is_fake_quant(weight) else None


def float_channel_means(graph_module: fx.GraphModule, layers: dict[fx.Node, int],
                        batches: list[tuple[torch.Tensor, ...]]) -> dict[fx.Node, torch.Tensor]:
    """Per-sample channel means and mean squares (``[2, samples, channels]``, float64) of each layer's float output.

    ``layers`` maps each node to its channel dimension. The float model is ``graph_module`` with
    every fake-quant node bypassed; it runs as one compiled graph whose only outputs are the
    means, so nothing but them is kept from a batch.
    """
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(graph_module.graph, remap)
    for node in list(graph.nodes):
        if _is_fake_quant(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    nodes = list(layers)
    means = []
    for n in nodes:
        # Right after the layer: a later in-place op (hardswish_, relu_) may overwrite its output.
        with graph.inserting_after(remap[n]):
            means.append(graph.call_function(sample_channel_means, (remap[n], layers[n], True)))
    graph.output(tuple(means))
    probe = fx.GraphModule(graph_module, graph)
    # (no dead-code elimination: an in-place op whose result nobody reads still writes its input)
    probe.recompile()
    collected: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in nodes}
    with torch.no_grad():
        for batch in batches:
            for node, value in zip(nodes, probe(*batch)):
                collected[node].append(value)
    return {n: torch.cat(values, dim=1) for n, values in collected.items()}


def recorded_channel_means(graph_module: fx.GraphModule, nodes: list[fx.Node], batches: int) -> dict[fx.Node, torch.Tensor] | None:
    """The float channel means quantize-int8 recorded on ``nodes`` over the first ``batches`` calibration
    batches (as :func:`float_channel_means` returns them), or None when any is missing or stale."""
    out: dict[fx.Node, torch.Tensor] = {}
    holds: dict[int, bool] = {}  # one key per quantize-int8 run: checked once
    for node in nodes:
        recorded = node.meta.get(FLOAT_CHANNEL_STATS)
        if recorded is None or len(recorded[1]) < batches:
            return None
        key = recorded[0]
        if id(key) not in holds:
            holds[id(key)] = float_stats_hold(key, graph_module)
        if not holds[id(key)]:
            return None
        out[node] = torch.cat(recorded[1][:batches], dim=1)
    return out


class _Lockstep:
    """Evaluates the quantized graph op by op on all batches at once (one value per batch per node).

    A node that reads no input (a weight's fake-quant) is computed once and shared by all batches.
    Values are dropped once their last reader has run, so memory stays near one forward per batch.
    """

    def __init__(self, graph_module: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.graph_module = graph_module
        self.batches = batches
        self.values: dict[fx.Node, list[Any]] = {}
        nodes = list(graph_module.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        order = {n: i for i, n in enumerate(nodes)}
        self.last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
        self.order = order
        self.constant: set[fx.Node] = set()
        for node in nodes:
            if node.op == "get_attr" or (node.op == "call_function" and all(
                    a in self.constant for a in node.all_input_nodes)):
                self.constant.add(node)

    def _attribute(self, target: str) -> Any:
        owner = self.graph_module
        for part in target.split("."):
            owner = getattr(owner, part)
        return owner

    def _call(self, node: fx.Node, read) -> Any:
        args = fx.node.map_arg(node.args, read)
        kwargs = fx.node.map_arg(node.kwargs, read)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.graph_module.get_submodule(str(node.target))(*args, **kwargs)

    def evaluate(self, node: fx.Node) -> list[Any]:
        """Compute (and keep) ``node``'s value for every batch."""
        if node.op == "get_attr":  # read when used: a corrected bias is a new get_attr
            return []
        count = len(self.batches)
        if node.op == "placeholder":
            index = self.placeholders.index(node)
            out = [batch[index] for batch in self.batches]
        elif node in self.constant:
            out = [self._call(node, lambda n: self._attribute(str(n.target)) if n.op == "get_attr" else self.values[n][0])] * count
        elif node.op in ("call_function", "call_method", "call_module"):
            out = []
            for i in range(count):
                read = lambda n, i=i: self._attribute(str(n.target)) if n.op == "get_attr" else self.values[n][i]  # noqa: E731
                out.append(self._call(node, read))
        else:  # output
            out = []
        self.values[node] = out
        return out

    def release(self, done: fx.Node) -> None:
        """Forget values whose last reader is ``done`` (or earlier)."""
        position = self.order[done]
        for node in [n for n in self.values if self.last_use[n] <= position]:
            del self.values[node]


def shrinkage_factors(errors: torch.Tensor, significance: float) -> torch.Tensor:
    """Per-channel ``max(0, 1 - (k se / m)^2)`` of ``[samples, channels]`` mean errors, ``k = significance``.

    See the module docstring; ``significance=0`` gives factors of one (the full means).
    """
    mean = errors.mean(0)
    if significance == 0:
        return torch.ones_like(mean)
    variance_of_mean = errors.var(0, unbiased=True) / errors.shape[0]
    factor = 1 - significance ** 2 * variance_of_mean / mean.pow(2).clamp_min(torch.finfo(mean.dtype).tiny)
    return factor.clamp_min(0)


@dataclass(frozen=True)
class CorrectBiasOptions:
    calibration_batches: int = option(32, "use at most this many calibration batches to estimate the mean errors")
    min_samples: int = option(64, "skip layers that see fewer values per output channel than this")
    significance: float = option(2.0, "standard errors a channel's mean error must exceed to be corrected; the "
                                      "correction is scaled by max(0, 1 - (k se / mean)^2); 0 applies every mean in full")

    max_relative_shift: float | None = option(0.5, "leave channels alone whose mean error exceeds this fraction of the "
                                                   "channel's float standard deviation (None: no limit)")

    def __post_init__(self) -> None:
        if self.max_relative_shift is not None and not self.max_relative_shift > 0:
            raise RecipeError(f"correct-bias: max_relative_shift must be positive, got {self.max_relative_shift}.",
                              "use e.g. 0.5, or None for no limit.")
        if not self.significance >= 0:
            raise RecipeError(f"correct-bias: significance must be >= 0, got {self.significance}.",
                              "use e.g. 2 (two standard errors), or 0 to apply every mean error in full.")


@register
class CorrectBiasPass(DataDrivenPass):
    """Empirical bias correction after ``quantize-int8``: subtract each quantized layer's significant mean output error.

    Runs the calibration data through the float model (compiled, channel means only) and the
    quantized graph (all batches in lockstep), corrects conv/linear biases in graph order, each
    channel's correction shrunk by its significance; see the module docstring. A graph without
    quantize-int8's fake-quant is left unchanged.
    """

    name = "correct-bias"
    runs_on = "quantized"
    Options = CorrectBiasOptions
    lossless = False
    exports_exactly = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        layers = [layer for n in graph_module.graph.nodes if (layer := _quantized_layer(n)) is not None]
        pending = [layer for layer in layers if BIAS_CORRECTED not in layer.node.meta]
        if not pending:
            return PassResult(graph_module, False, {"corrected": 0, "already_corrected": len(layers)})
        context = self.context if self.context is not None else CompileContext(example_inputs=())
        batches = context.calibration.take(graph_module, self.name, self.options.calibration_batches)
        ctx = RewriteContext(graph_module, self.name)
        rejections: list[Rejection] = []
        targets: dict[fx.Node, WeightedLayer] = {}
        for layer in pending:
            reason = self._problem(ctx, layer, batches)
            if reason is not None:
                rejections.append(Rejection("bias-correction", layer.node.name, reason))
            else:
                targets[layer.node] = layer
        shifts: dict[str, float] = {}
        kept: list[float] = []
        float_pass = False
        if targets:
            with torch.no_grad():
                reference = recorded_channel_means(graph_module, list(targets), len(batches))
                float_pass = reference is None
                if reference is None:
                    reference = float_channel_means(graph_module, {n: layer.channel_dim for n, layer in targets.items()},
                                                    batches)
                run = _Lockstep(graph_module, batches)
                for node in list(graph_module.graph.nodes):
                    if node.op == "output":
                        break
                    quant = run.evaluate(node)
                    layer = targets.get(node)
                    if layer is not None:
                        correction, share = self._correction(layer, quant, reference.pop(node))
                        kept.append(share)
                        if correction is None:
                            rejections.append(Rejection("bias-correction", node.name,
                                                        "no channel's mean error is significant against its standard error and "
                                                        "small against the channel's spread"))
                        else:
                            self._apply(ctx, layer, correction)
                            shifts[layer_name(node)] = float(correction.abs().max())
                            shape = [1] * quant[0].dim()
                            shape[layer.channel_dim] = -1
                            delta = correction.reshape(shape)
                            run.values[node] = [q - delta.to(q.dtype) for q in quant]  # what the new bias gives
                    run.release(node)
        if shifts:
            graph_module.recompile()
        stats = {"corrected": len(shifts), "skipped": len(rejections), "calibration_batches": len(batches),
                 "float_means": ("none needed" if not targets else "own float pass" if float_pass
                                 else "recorded by quantize-int8"),
                 "largest_shift": max(shifts.values(), default=0.0),
                 "mean_kept_fraction": sum(kept) / len(kept) if kept else 0.0}
        return PassResult(graph_module, bool(shifts), stats, rejections)

    def _problem(self, ctx: RewriteContext, layer: WeightedLayer, batches: list[tuple[torch.Tensor, ...]]) -> str | None:
        """Why ``layer`` cannot be corrected, or None."""
        dim = layer.channel_dim
        val = layer.node.meta.get("val")
        if dim is None or not isinstance(val, torch.Tensor):
            return "the layer's output shape is unknown"
        bias = layer.bias
        if bias is not None:
            if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
                return "the bias is computed at run time, not a constant"
            shared = ctx.sharing_problem(bias, layer.node, "bias")
            if shared:
                return shared
        per_batch = val.numel() // max(val.shape[dim], 1)
        samples = per_batch * len(batches)
        if samples < self.options.min_samples:
            return (f"only {samples} values per output channel in the calibration data (min_samples="
                    f"{self.options.min_samples}): the mean error would be mostly noise")
        items = (val.shape[0] if dim != 0 and val.dim() > 1 else 1) * len(batches)
        if self.options.significance > 0 and items < 2:
            return ("a single calibration sample: the significance of its mean error is unknown "
                    "(give more calibration inputs, or significance=0)")
        return None

    def _correction(self, layer: WeightedLayer, quant: list[Any],
                    reference: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """The per-channel amount to subtract from the bias (None if nothing is significant), and the kept share."""
        means, squares = reference
        errors = torch.cat([sample_channel_means(q, layer.channel_dim) for q in quant]) - means
        correction = errors.mean(0)
        factors = shrinkage_factors(errors, self.options.significance)
        if self.options.max_relative_shift is not None:
            # A mean error beyond a fraction of the channel's spread is no small perturbation: the
            # quantized channel is wrong in shape (collapsed or clipped), not only in its mean, and
            # moving its mean moves it past the activation and the next quantizer's range instead.
            spread = (squares.mean(0) - means.mean(0).square()).clamp_min(0).sqrt()
            factors = torch.where(correction.abs() > self.options.max_relative_shift * spread, 0.0, factors)
        share = float(factors.mean())
        if not bool((factors > 0).any()):
            return None, share
        return correction * factors, share

    def _apply(self, ctx: RewriteContext, layer: WeightedLayer, error: torch.Tensor) -> None:
        node = layer.node
        weight_source = layer.weight.args[0]  # the get_attr the fake-quant reads
        if layer.bias is None:
            dtype = ctx.constant(weight_source).dtype
            new_bias = (-error).to(dtype)
            set_argument(node, "bias", ctx.new_state(weight_source, "bias_corrected", new_bias, node))
        else:
            old = ctx.constant(layer.bias)
            new_bias = (old.double() - error).to(old.dtype)
            old_node = layer.bias
            set_argument(node, "bias", ctx.new_state(old_node, "bias_corrected", new_bias, node, old_node))
            ctx.erase(old_node)
        node.meta[BIAS_CORRECTED] = True
__all__ = ["CorrectBiasPass"]
