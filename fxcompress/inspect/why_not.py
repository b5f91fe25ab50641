""""Why didn't it fuse?": the near-misses passes reported, grouped by rule, with layer names.

Fusion passes return a :class:`~fxcompress.infra.pass_base.Rejection` (rule, node, reason) for
every place a pattern matched but a check declined the rewrite (weight shared elsewhere, batch
norm in training mode, ...). The PassManager keeps them in each PassRecord; this module collects
them from a compile run, removes repeats from fixed-point iterations, and looks up the layer of
each node in the run's graph snapshots.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from fxcompress.infra.instrument import PassRecord
from fxcompress.analysis.snapshot import GraphSnapshot


@dataclass(frozen=True)
class NearMiss:
    """One rejected match: which pass and rule, at which node (and layer), and why."""

    pass_name: str
    rule: str
    node: str
    layer: str
    reason: str


def _layers(snapshots: Iterable[GraphSnapshot]) -> dict[str, str]:
    layers: dict[str, str] = {}
    for snap in snapshots:  # later snapshots win: they name the graph the pass saw last
        for n in snap.nodes:
            if n.layer:
                layers[n.name] = n.layer
    return layers


def near_misses(records: Sequence[PassRecord], snapshots: Iterable[GraphSnapshot] = ()) -> dict[str, list[NearMiss]]:
    """Rejections of a compile run as ``{rule: [NearMiss, ...]}``, rules sorted, repeats removed."""
    layers = _layers(snapshots)
    seen: set[tuple[str, str, str]] = set()
    out: dict[str, list[NearMiss]] = defaultdict(list)
    for record in records:
        for r in record.rejections:
            key = (r.rule, r.node, r.reason)
            if key in seen:
                continue
            seen.add(key)
            out[r.rule].append(NearMiss(record.name, r.rule, r.node, layers.get(r.node, ""), r.reason))
    return dict(sorted(out.items()))


def why_not(result: Any) -> dict[str, list[NearMiss]]:
    """Near-misses of a :class:`~fxcompress.api.CompileResult` (or a CompileReport)."""
    report = getattr(result, "report", result)
    recorder = getattr(result, "snapshots", None)
    return near_misses(report.records, recorder.snapshots if recorder is not None else ())
