"""Structured channel pruning: remove whole channels so layers become physically smaller.

The channel dependency analysis (:mod:`fxcompress.analysis.channel_graph`) splits the graph's
channels into groups that must change together (a conv's outputs, its batch norm, the next
conv's inputs, every branch of a residual add...). For each prunable group the pass scores the
channels, keeps the most important ``1 - ratio`` share, and slices every coupled parameter,
buffer and size argument at once; then it refreshes ``node.meta["val"]``. Groups the analysis
refuses (the output layer, attention heads, channels that meet an unknown op) are left alone and
listed with the reason in ``stats["skipped"]`` and the rejections.

Importance (option ``importance``):
  * ``l1`` / ``l2``: the norm of each channel's slice in every weight of the group (producer
    outputs, consumer inputs, norm scales), each tensor's scores divided by their mean so that
    big and small tensors weigh the same; summed over the group. This is Torch-Pruning's
    group magnitude importance.
  * ``bn-scale``: ``|gamma|`` of the group's batch/layer norms (Network Slimming); groups with
    no norm fall back to ``l1``.

Allocation (option ``allocation``): ``uniform`` removes ``ratio`` of every group; ``global``
ranks all channels of all groups on a common scale and removes the lowest ``ratio`` share of the
total, never more than ``max_group_ratio`` of one group.

Pruning is lossy: outputs change until the model is fine-tuned (``result.module`` trains).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from fxcompress.analysis.attributes import attribute, replace_attribute
from fxcompress.analysis.channel_graph import ChannelGraph, ChannelGroup, build_channel_graph, keep_indices, pruned_length
from fxcompress.analysis.macs import count_macs
from fxcompress.analysis.shapes import refresh_shapes
from fxcompress.errors import RecipeError
from fxcompress.graph_meta import PRUNED_META, layer_override
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import Pass, PassResult, Rejection, option
from fxcompress.infra.registry import register

@dataclass(frozen=True)
class PruneChannelsOptions:
    ratio: float = option(0.5, "share of channels removed from each prunable group (Torch-Pruning's pruning_ratio)")
    importance: Literal["l1", "l2", "bn-scale"] = option("l1", "channel importance: weight L1/L2 norm or batch-norm |gamma|")
    allocation: Literal["uniform", "global"] = option("uniform", "same ratio per group, or one ranking over all groups")
    overrides: dict | None = option(None, "per-layer ratios: {'layer4.*': 0.3, 'conv1': 0.0}; fnmatch patterns on layer names")
    round_to: int = option(1, "keep a multiple of this many channels per group (8 or 16 suits SIMD kernels)")
    max_group_ratio: float = option(0.9, "global allocation never removes more than this share of one group")


def _validate(options: PruneChannelsOptions) -> None:
    ratios = [("ratio", options.ratio), ("max_group_ratio", options.max_group_ratio)]
    ratios += [(f"overrides[{k!r}]", v) for k, v in (options.overrides or {}).items()]
    for label, value in ratios:
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise RecipeError(f"Pass 'prune-channels' option {label} is {value!r}; it must be in [0, 1).",
                              "give the share of channels to remove, e.g. 0.5 removes half.")
    if options.round_to < 1:
        raise RecipeError(f"Pass 'prune-channels' option round_to is {options.round_to}; it must be >= 1.",
                          "use 1 (no rounding) or a multiple such as 8.")


def _channel_scores(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, importance: str) -> torch.Tensor:
    """One score per channel of ``group`` (higher = keep)."""
    members = set(group.spaces)
    roles = {"scale"} if importance == "bn-scale" else {"out", "in", "scale"}
    for attempt in (roles, {"out", "in", "scale"}):
        scores = torch.zeros(group.channels, dtype=torch.float64)
        used = 0
        for pd in cg.param_dims:
            if pd.role not in attempt or not any(s.space in members for s in pd.layout):
                continue
            tensor = attribute(gm, pd.target).detach().to(torch.float64)
            if tensor.dim() <= pd.dim:
                continue
            moved = tensor.movedim(pd.dim, 0).reshape(tensor.shape[pd.dim], -1)
            per_index = moved.abs().sum(1) if importance != "l2" else moved.pow(2).sum(1)
            offset = 0
            for seg in pd.layout:
                if seg.space in members:
                    block = per_index[offset:offset + seg.length].reshape(seg.channels, seg.inner).sum(1)
                    mean = block.mean()
                    scores += block / mean if mean > 0 else block
                    used += 1
                offset += seg.length
        if used:
            return scores.sqrt() if importance == "l2" else scores
    return scores


def _keep_count(channels: int, ratio: float, round_to: int) -> int:
    keep = max(1, int(round(channels * (1.0 - ratio))))
    if round_to > 1:
        keep = min(channels, max(round_to, int(math.ceil(keep / round_to)) * round_to))
    return keep


def _group_ratio(group: ChannelGroup, options: PruneChannelsOptions) -> float:
    value = layer_override(options.overrides, group.layers)
    return options.ratio if value is None else float(value)


def _select(gm: fx.GraphModule, cg: ChannelGraph, groups: list[ChannelGroup],
            options: PruneChannelsOptions) -> dict[int, torch.Tensor]:
    """group id -> sorted channel indices to keep (only groups that lose channels)."""
    scores = {g.id: _channel_scores(gm, cg, g, options.importance) for g in groups}
    keep_counts: dict[int, int] = {}
    if options.allocation == "uniform" or options.overrides:
        for g in groups:
            keep_counts[g.id] = _keep_count(g.channels, _group_ratio(g, options), options.round_to)
    if options.allocation == "global":
        free = [g for g in groups if not options.overrides or _group_ratio(g, options) == options.ratio]
        if free:
            # Scores are on a common scale: each group's channels divided by the group's mean.
            pooled = torch.cat([scores[g.id] / scores[g.id].mean().clamp_min(1e-12) for g in free])
            total_remove = int(round(len(pooled) * options.ratio))
            threshold = pooled.sort().values[total_remove - 1] if total_remove > 0 else -math.inf
            for g in free:
                normalized = scores[g.id] / scores[g.id].mean().clamp_min(1e-12)
                keep = int((normalized > threshold).sum())
                floor = _keep_count(g.channels, options.max_group_ratio, 1)
                keep_counts[g.id] = _keep_count(g.channels, 1.0 - max(keep, floor) / g.channels, options.round_to)
    selected = {}
    for g in groups:
        keep = keep_counts[g.id]
        if keep >= g.channels:
            continue
        order = torch.argsort(scores[g.id], descending=True, stable=True)
        selected[g.id] = order[:keep].sort().values
    return selected


def apply_channel_selection(gm: fx.GraphModule, cg: ChannelGraph, kept: dict[int, torch.Tensor]) -> int:
    """Slice every parameter, buffer and size argument for ``kept`` (space id -> channels kept).

    Returns the number of tensors replaced. Shapes in ``meta["val"]`` are stale afterwards.
    """
    per_target: dict[str, dict[int, Any]] = {}
    for pd in cg.param_dims:
        per_target.setdefault(pd.target, {})[pd.dim] = pd.layout
    replaced = 0
    for target, dims in per_target.items():
        tensor = attribute(gm, target)
        new = tensor.detach()
        changed = False
        for dim, layout in dims.items():
            if not any(s.space in kept for s in layout):
                continue
            new = new.index_select(dim, keep_indices(layout, kept).to(new.device))
            changed = True
        if changed:
            replace_attribute(gm, target, new.detach().clone())  # a smaller copy, same kind
            replaced += 1
    nodes = {n.name: n for n in gm.graph.nodes}
    for sa in cg.size_args:
        if not any(s.space in kept for s in sa.layout):
            continue
        node = nodes[sa.node]
        length = pruned_length(sa.layout, kept)
        args = list(node.args)
        if sa.index is None:
            args[sa.arg] = length
        else:
            values = list(args[sa.arg])
            values[sa.index] = length
            args[sa.arg] = values
        node.args = tuple(args)
    return replaced


@register
class PruneChannelsPass(Pass):
    """Remove the least important channels of every prunable channel group (structured pruning).

    Stats: groups found/pruned/skipped, channels before/after per layer, MACs and parameters
    before/after; ``skipped`` lists ``{"group", "reason"}`` for each group left alone.
    """

    name = "prune-channels"
    Options = PruneChannelsOptions
    lossless = False

    def __init__(self, options: Any = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        _validate(self.options)
        self._inputs: tuple[torch.Tensor, ...] | None = None

    def bind(self, context: CompileContext) -> None:
        self._inputs = context.example_inputs

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if graph_module.meta.get(PRUNED_META):
            return PassResult(graph_module, False, {"already_pruned": True})
        cg = build_channel_graph(graph_module)
        groups = cg.groups()
        prunable = [g for g in groups if g.prunable]
        skipped = [{"group": g.name, "reason": "; ".join(g.reasons)} for g in groups if not g.prunable]
        rejections = [Rejection("prune-channels", g.name, "; ".join(g.reasons)) for g in groups if not g.prunable]
        stats: dict[str, Any] = {"groups": len(groups), "prunable": len(prunable), "skipped": skipped}
        selection = _select(graph_module, cg, prunable, self.options) if prunable else {}
        if not selection:
            stats["pruned"] = 0
            return PassResult(graph_module, False, stats, rejections)
        macs_before = count_macs(graph_module)
        params_before = sum(p.numel() for p in graph_module.parameters())
        kept = {sid: selection[g.id] for g in prunable if g.id in selection for sid in g.spaces}
        layers = {}
        for g in prunable:
            for sid in g.spaces:
                space = cg.spaces[sid]
                after = len(kept[sid]) if sid in kept else space.channels
                layers[space.layer] = f"{space.channels}->{after}"
        apply_channel_selection(graph_module, cg, kept)
        graph_module.recompile()
        refresh_shapes(graph_module, self._inputs)
        graph_module.meta[PRUNED_META] = True
        macs_after = count_macs(graph_module)
        stats.update({
            "pruned": len(selection),
            "channels": layers,
            "macs_before": macs_before,
            "macs_after": macs_after,
            "params_before": params_before,
            "params_after": sum(p.numel() for p in graph_module.parameters()),
        })
        return PassResult(graph_module, True, stats, rejections)


__all__ = ["PruneChannelsOptions", "PruneChannelsPass", "apply_channel_selection"]
