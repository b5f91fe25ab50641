"""Weight sparsity with masks kept in the graph: 2:4 semi-structured and unstructured magnitude.

Each pruned weight ``W`` of a convolution or linear layer is rewritten as ``W * M`` in the graph
(``aten.mul`` of the parameter and a 0/1 mask buffer registered next to it), and ``W`` itself is
zeroed where ``M`` is 0. Because the product is computed in the graph, fine-tuning
``result.module`` keeps the pattern: the gradient reaching ``W`` is ``grad * M``, so masked
weights get no update and the optimiser cannot regrow them. Export bakes ``W * M`` into one
weight (:func:`fxcompress.export.sparse.bake_weight_masks`).

* ``sparsify-2:4`` keeps the 2 largest-magnitude weights in every group of 4 consecutive
  weights along the input-channel (reduction) dimension, the pattern NVIDIA sparse tensor
  cores and TensorRT accelerate. Layers whose input channels are not a multiple of 4 are skipped
  with a reason.
* ``sparsify-magnitude`` zeroes the smallest-magnitude ``sparsity`` share of weights, over all
  layers at once (``global``) or in each layer (``layer``), with per-layer overrides.

Both are lossy (outputs change until fine-tuned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from fxcompress.analysis.attributes import add_attribute, attribute_owner
from fxcompress.errors import RecipeError
from fxcompress.graph_meta import MASK_META, layer_override
from fxcompress.infra.pass_base import Pass, PassResult, Rejection, option
from fxcompress.infra.registry import register

aten = torch.ops.aten

_MASKABLE = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}


def masked_weights(graph_module: fx.GraphModule) -> list[fx.Node]:
    """The mask-applying ``aten.mul`` nodes already in the graph."""
    return [n for n in graph_module.graph.nodes if n.meta.get(MASK_META)]


def _candidates(graph_module: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Unmasked weight get_attr nodes (parameters) -> the conv/linear nodes reading them."""
    params = dict(graph_module.named_parameters())
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _MASKABLE and len(node.args) > 1:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in params:
                found.setdefault(weight, []).append(node)
    return found


def apply_mask(graph_module: fx.GraphModule, weight: fx.Node, users: list[fx.Node], mask: torch.Tensor) -> None:
    """Register ``mask`` beside the weight, zero the weight there and route ``users`` through ``W * M``."""
    owner, name = attribute_owner(graph_module, weight.target)
    param = getattr(owner, name)
    mask = mask.to(dtype=param.dtype, device=param.device)
    buffer_name = add_attribute(owner, f"{name}_mask", mask)
    with torch.no_grad():
        param.mul_(mask)
    mask_target = f"{weight.target.rpartition('.')[0]}.{buffer_name}".lstrip(".")
    with graph_module.graph.inserting_before(users[0]):
        mask_node = graph_module.graph.get_attr(mask_target)
        mul = graph_module.graph.call_function(aten.mul.Tensor, (weight, mask_node))
    if "val" in weight.meta:
        mask_node.meta["val"] = weight.meta["val"]
        mul.meta["val"] = weight.meta["val"]
    mul.meta[MASK_META] = True
    for user in users:
        user.replace_input_with(weight, mul)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive weights along dim 1 (input channels)."""
    moved = weight.detach().movedim(1, -1)  # [out, *kernel, in]
    groups = moved.abs().reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(moved.shape).movedim(-1, 1)


@register
class SparsifyTwoFourPass(Pass):
    """2:4 semi-structured sparsity of conv/linear weights along the input-channel dimension."""

    name = "sparsify-2:4"
    lossless = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        masked, zeroed, total = 0, 0, 0
        rejections = []
        for weight, users in _candidates(graph_module).items():
            param = graph_module.get_parameter(weight.target)
            if param.dim() < 2 or param.shape[1] % 4:
                rejections.append(Rejection(self.name, weight.target,
                                            f"input channels {param.shape[1] if param.dim() > 1 else 1} are not a multiple of 4"))
                continue
            mask = two_four_mask(param)
            apply_mask(graph_module, weight, users, mask)
            masked += 1
            zeroed += int((~mask).sum())
            total += mask.numel()
        stats: dict[str, Any] = {"masked": masked, "skipped": len(rejections),
                                 "sparsity": round(zeroed / total, 4) if total else 0.0}
        return PassResult(graph_module, bool(masked), stats, rejections)


@dataclass(frozen=True)
class SparsifyMagnitudeOptions:
    sparsity: float = option(0.5, "share of weights set to zero (of all layers for global, of each layer for layer)")
    allocation: Literal["global", "layer"] = option("global", "one magnitude threshold over all layers, or one per layer")
    overrides: dict | None = option(None, "per-layer sparsity: {'fc': 0.0, 'layer4.*': 0.9}; fnmatch on weight names")
    min_elements: int = option(0, "leave weights with fewer elements than this dense (e.g. a tiny first conv)")


def _layer_override(target: str, overrides: dict | None) -> float | None:
    value = layer_override(overrides, (target.rpartition(".")[0], target))
    return None if value is None else float(value)


@register
class SparsifyMagnitudePass(Pass):
    """Unstructured magnitude sparsity: zero the smallest weights, globally or per layer."""

    name = "sparsify-magnitude"
    Options = SparsifyMagnitudeOptions
    lossless = False

    def __init__(self, options: Any = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        values = [("sparsity", self.options.sparsity)]
        values += [(f"overrides[{k!r}]", v) for k, v in (self.options.overrides or {}).items()]
        for label, value in values:
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise RecipeError(f"Pass 'sparsify-magnitude' option {label} is {value!r}; it must be in [0, 1).",
                                  "give the share of weights to zero, e.g. 0.8.")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        opts = self.options
        chosen: dict[fx.Node, tuple[list[fx.Node], float | None]] = {}
        rejections = []
        for weight, users in _candidates(graph_module).items():
            param = graph_module.get_parameter(weight.target)
            if param.numel() < opts.min_elements:
                rejections.append(Rejection(self.name, weight.target, f"{param.numel()} elements < min_elements"))
                continue
            override = _layer_override(weight.target, opts.overrides)
            if override == 0.0:
                continue
            chosen[weight] = (users, override if override is not None else
                              (opts.sparsity if opts.allocation == "layer" else None))
        pooled = [graph_module.get_parameter(w.target).detach().abs().reshape(-1) for w, (_, s) in chosen.items() if s is None]
        threshold = None
        if pooled and opts.sparsity > 0:
            everything = torch.cat(pooled)
            k = int(round(everything.numel() * opts.sparsity))
            threshold = everything.kthvalue(k).values if k > 0 else None
        masked = zeroed = total = 0
        for weight, (users, share) in chosen.items():
            param = graph_module.get_parameter(weight.target).detach()
            if share is None:
                if threshold is None:
                    continue
                mask = param.abs() > threshold
            else:
                k = int(round(param.numel() * share))
                if k == 0:
                    continue
                cut = param.abs().reshape(-1).kthvalue(k).values
                mask = param.abs() > cut
            apply_mask(graph_module, weight, users, mask)
            masked += 1
            zeroed += int((~mask).sum())
            total += mask.numel()
        stats = {"masked": masked, "sparsity": round(zeroed / total, 4) if total else 0.0}
        return PassResult(graph_module, bool(masked), stats, rejections)


__all__ = ["SparsifyMagnitudeOptions", "SparsifyMagnitudePass", "SparsifyTwoFourPass",
           "apply_mask", "masked_weights", "two_four_mask"]
