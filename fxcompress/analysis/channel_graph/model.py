"""What the channel analysis finds: layouts of tracked dimensions, channel spaces, the coupling
graph and its groups, and how a layout is sliced once channels are chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import torch
from torch import fx


@dataclass(frozen=True)
class Segment:
    """``channels`` channels of ``space`` (None: a fixed, unprunable run), each ``inner`` elements wide."""

    space: int | None
    channels: int
    inner: int = 1

    @property
    def length(self) -> int:
        return self.channels * self.inner


Layout = tuple[Segment, ...]


def layout_length(layout: Layout) -> int:
    return sum(s.length for s in layout)


def layout_spaces(layout: Layout | None) -> set[int]:
    return {s.space for s in layout or () if s.space is not None}


@dataclass
class ChannelSpace:
    """An index set created by a producer layer."""

    id: int
    channels: int
    producer: str  # fx node name
    layer: str  # parameter owner, e.g. "layer1.0.conv1"
    kind: str  # "conv", "linear", "embedding"


@dataclass
class ParamDim:
    """Dimension ``dim`` of parameter/buffer ``target`` is indexed by ``layout``; ``role`` guides importance."""

    target: str
    dim: int
    layout: Layout
    role: str  # "out", "in", "scale", "shift", "stat", "other"
    user: str  # node name of the op that reads it this way


@dataclass
class SizeArg:
    """An int argument (``args[arg]`` or ``args[arg][index]``) of ``node`` equal to a layout's length."""

    node: str
    arg: int
    index: int | None
    layout: Layout


@dataclass
class ChannelGroup:
    """Coupled channel spaces pruned together (all the same number of channels)."""

    id: int
    spaces: list[int]
    channels: int
    layers: list[str]
    reasons: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def name(self) -> str:
        return "+".join(self.layers[:3]) + (f"+{len(self.layers) - 3} more" if len(self.layers) > 3 else "")


class ChannelGraph:
    """The result of :func:`build_channel_graph`.

    Attributes:
        graph: networkx Graph whose nodes are space ids (attribute ``space``) and whose edges
            couple two spaces (attribute ``via``: the fx node that forces it).
        spaces: space id -> ChannelSpace.
        blocked: space id -> reasons it cannot be pruned.
        param_dims: every parameter/buffer dimension indexed by tracked channels.
        size_args: every int argument that states a tracked dimension's size.
        layouts: fx node name -> {dim: layout} for tracked tensor dimensions.
    """

    def __init__(self) -> None:
        self.graph = nx.Graph()
        self.spaces: dict[int, ChannelSpace] = {}
        self.blocked: dict[int, list[str]] = {}
        self.param_dims: list[ParamDim] = []
        self.size_args: list[SizeArg] = []
        self.layouts: dict[str, dict[int, Layout]] = {}

    def new_space(self, channels: int, producer: fx.Node, layer: str, kind: str) -> int:
        sid = len(self.spaces)
        self.spaces[sid] = ChannelSpace(sid, channels, producer.name, layer, kind)
        self.graph.add_node(sid, space=self.spaces[sid])
        return sid

    def couple(self, a: int, b: int, via: str) -> None:
        if a != b:
            self.graph.add_edge(a, b, via=via)

    def block(self, spaces: Iterable[int], reason: str) -> None:
        for sid in spaces:
            reasons = self.blocked.setdefault(sid, [])
            if reason not in reasons:
                reasons.append(reason)

    def groups(self) -> list[ChannelGroup]:
        """Connected components of the coupling graph, in producer order, with refusal reasons."""
        out = []
        for component in sorted(nx.connected_components(self.graph), key=min):
            members = sorted(component)
            sizes = {self.spaces[s].channels for s in members}
            reasons: list[str] = []
            for sid in members:
                for r in self.blocked.get(sid, []):
                    if r not in reasons:
                        reasons.append(r)
            if len(sizes) != 1:
                reasons.append(f"coupled layers disagree on the channel count {sorted(sizes)}")
            layers = []
            for sid in members:
                if self.spaces[sid].layer not in layers:
                    layers.append(self.spaces[sid].layer)
            out.append(ChannelGroup(len(out), members, min(sizes), layers, reasons))
        return out


def keep_indices(layout: Layout, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """Indices along a dimension with ``layout`` that survive, given kept channels per space."""
    parts, offset = [], 0
    for seg in layout:
        channels = kept.get(seg.space) if seg.space is not None else None
        if channels is None:
            channels = torch.arange(seg.channels)
        block = (channels[:, None] * seg.inner + torch.arange(seg.inner)[None, :]).reshape(-1)
        parts.append(block + offset)
        offset += seg.length
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def pruned_length(layout: Layout, kept: dict[int, torch.Tensor]) -> int:
    """The length of a dimension with ``layout`` after pruning."""
    return sum((len(kept[s.space]) if s.space in kept else s.channels) * s.inner for s in layout)
