"""Activation smoothing before static int8 (SmoothQuant): move per-channel activation outliers into weights.

Trained transformers put most of a LayerNorm output's range into a few channels (a large
``gamma`` there): one per-tensor uint8 scale then spends its 256 levels on those channels and the
others are left with a handful of levels each. The weights of the linear layers reading that
tensor are quantized per *output* channel, so they can absorb a per-*input*-channel factor at no
cost. For every channel ``j`` of the LayerNorm output, with ``a_j`` its largest ``|x|`` on the
calibration data and ``w_j`` the largest ``|W[:, j]|`` over all the linear layers reading it::

    s_j = a_j ** alpha / w_j ** (1 - alpha)

the LayerNorm's ``gamma`` and ``beta`` are divided by ``s`` and each reader's weight columns
multiplied by ``s``. ``(W * s) @ (y / s) == W @ y``: the float model computes the same function
(to fp32 rounding), but after the pass activation and weight ranges are balanced, so both quantize
well. ``alpha`` sets how much difficulty moves to the weights (0: none, 1: all; 0.5 by default).

The factor goes into the producer, so nothing is inserted. That needs every reader of the
tensor to be a linear layer (they all see the same scaled tensor); a LayerNorm read by anything
else (a residual add, pooling, a GELU) is left alone with the reason in the report. Running the
pass again computes ``s == 1`` everywhere (the ranges are already balanced) and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from fxcompress.errors import RecipeError
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import DataDrivenPass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.passes.calibrators import observe_channel_ranges
from fxcompress.passes.quantize import layer_name
from fxcompress.rewrite.context import RewriteContext
from fxcompress.rewrite.matchers import argument, attribute, constant_tensor, set_argument, tensor_val

aten = torch.ops.aten

#: A factor this close to 1 on every channel changes nothing worth a rewrite (and makes the pass
#: idempotent: after smoothing, the recomputed factors are 1 up to rounding).
_BALANCED = 0.01


@dataclass
class _Site:
    """A LayerNorm whose output only linear layers read, with the constants the rewrite touches."""

    norm: fx.Node
    gamma: fx.Node
    beta: fx.Node | None
    linears: list[fx.Node]


def _site(ctx: RewriteContext, node: fx.Node) -> _Site | str:
    """The smoothing site at LayerNorm ``node``, or why there is none (the rejection reason)."""
    shape = argument(node, "normalized_shape")
    gamma, beta = argument(node, "weight"), argument(node, "bias")
    val = tensor_val(node)
    if val is None or not val.is_floating_point() or len(shape) != 1:
        return "only a float LayerNorm over the last dimension can absorb per-channel factors"
    if not isinstance(gamma, fx.Node) or ctx.constant(gamma) is None:
        return "the LayerNorm has no constant weight (elementwise_affine=False) to absorb the factors"
    if beta is not None and (not isinstance(beta, fx.Node) or ctx.constant(beta) is None):
        return "the LayerNorm's bias is not a constant"
    linears = []
    for user in node.users:
        if user.target is not aten.linear.default or user.args[0] is not node:
            return (f"its output is also read by '{user.name}' ({user.target}), not a linear layer: every reader "
                    "would have to undo the factors")
        weight = user.args[1]
        if not isinstance(weight, fx.Node) or ctx.constant(weight) is None:
            return f"linear '{user.name}' has no constant weight to absorb the factors"
        problem = ctx.sharing_problem(weight, user, "weight")
        if problem:
            return problem
        linears.append(user)
    if not linears:
        return "nothing reads its output"
    for const in (gamma, beta):
        problem = ctx.sharing_problem(const, node, "LayerNorm parameter") if const is not None else None
        if problem:
            return problem
    return _Site(node, gamma, beta, linears)


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j ** alpha / w_j ** (1 - alpha)``; 1 where a channel is all zero on either side."""
    a, w = act_amax.double(), weight_amax.double()
    s = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).float()


def _outlier_ratio(amax: torch.Tensor) -> float:
    """Largest channel range over the median one: how much one per-tensor scale wastes."""
    median = float(amax.median())
    return float(amax.max()) / median if median > 0 else float("inf")


@dataclass(frozen=True)
class SmoothActivationsOptions:
    alpha: float = option(0.5, "migration strength: 0 leaves activations alone, 1 moves all their range into weights")
    calibration_batches: int = option(64, "use at most this many calibration batches for the per-channel ranges")
    without_calibration: Literal["error", "skip"] = option(
        "error", "with nothing to calibrate on: raise (error) or leave the graph as it is and say so (skip)")

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise RecipeError(f"smooth-activations: alpha must be in [0, 1], got {self.alpha}.", "use e.g. 0.5 (SmoothQuant's default).")
        if self.calibration_batches < 1:
            raise RecipeError("smooth-activations: calibration_batches must be >= 1.", "use e.g. 64.")


@register
class SmoothActivationsPass(DataDrivenPass):
    """Calibrated SmoothQuant: per-channel LayerNorm output ranges moved into the reading linear layers' weights.

    Exact in fp32; makes the activations of trained transformers quantizable per tensor. Needs
    calibration data when the graph has a LayerNorm read only by linear layers; a no-op otherwise.
    """

    name = "smooth-activations"
    runs_on = "float"
    Options = SmoothActivationsOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        ctx = RewriteContext(graph_module, self.name)
        sites: list[_Site] = []
        rejections: list[Rejection] = []
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or node.target is not aten.layer_norm.default:
                continue
            found = _site(ctx, node)
            if isinstance(found, str):
                rejections.append(Rejection("smooth-layernorm", node.name, found))
            else:
                sites.append(found)
        if not sites:
            return PassResult(graph_module, False, {"smoothed": []}, rejections)
        context = self.context if self.context is not None else CompileContext(example_inputs=())
        if not context.calibration and self.options.without_calibration == "skip":
            # int8-dynamic needs no calibration; smoothing is its bonus when data is given.
            return PassResult(graph_module, False, {"smoothed": [], "skipped": "no calibration data (pass calibration= "
                                                    "to move outlier channels into the weights)"}, rejections)
        batches = context.calibration.take(graph_module, self.name, self.options.calibration_batches)
        act_amax = {node: amax.float() for node, amax in
                    observe_channel_ranges(graph_module, [site.norm for site in sites], batches, dim=-1).items()}
        smoothed = []
        for site in sites:
            weights = [constant_tensor(graph_module, lin.args[1]) for lin in site.linears]
            weight_amax = torch.cat([w.detach().abs() for w in weights]).amax(dim=0).float()
            amax = act_amax[site.norm]
            s = smoothing_factors(amax, weight_amax, self.options.alpha)
            if float((s - 1).abs().max()) <= _BALANCED:
                continue
            self._rewrite(ctx, graph_module, site, s)
            smoothed.append({"name": layer_name(site.norm), "linears": [layer_name(lin) for lin in site.linears],
                             "outlier_ratio_before": _outlier_ratio(amax), "outlier_ratio_after": _outlier_ratio(amax / s),
                             "max_factor": float(s.max()), "min_factor": float(s.min())})
        return PassResult(graph_module, bool(smoothed), {"smoothed": smoothed, "alpha": self.options.alpha,
                                                          "calibration_batches": len(batches)}, rejections)

    @staticmethod
    def _rewrite(ctx: RewriteContext, graph_module: fx.GraphModule, site: _Site, s: torch.Tensor) -> None:
        """LayerNorm parameters divided by ``s``, every reading linear's weight columns multiplied by it."""
        old = [site.gamma, *([site.beta] if site.beta is not None else [])]
        for name, const in (("weight", site.gamma), ("bias", site.beta)):
            if const is None:
                continue
            value = attribute(graph_module, str(const.target)).detach()
            new = ctx.new_state(const, f"{str(const.target).rpartition('.')[2]}_smoothed", value / s.to(value.dtype),
                                before=site.norm, replaces=const)
            set_argument(site.norm, name, new)
        for lin in site.linears:
            const = lin.args[1]
            value = attribute(graph_module, str(const.target)).detach()
            new = ctx.new_state(const, f"{str(const.target).rpartition('.')[2]}_smoothed", value * s.to(value.dtype),
                                before=lin, replaces=const)
            lin.replace_input_with(const, new)
            old.append(const)
        ctx.erase(*old)


__all__ = ["SmoothActivationsPass", "smoothing_factors"]
