"""Per-layer sensitivity and accuracy-driven mixed precision.

A lossy rewrite (quantization) is applied to one layer at a time and the output drift on sample
data is measured against the unmodified graph: that is the layer's *sensitivity*. Given a drift
budget, the most sensitive layers go back to float until the whole model is within budget.

Drift is :func:`fxcompress.numerics.worst_drift` (masked as the compile's drift is, see
:func:`masked_by`: padded positions do not count; largest abs error over an output divided by its
largest magnitude), the figure the compile report and the recipe tolerance use.

The analysis is independent of what the rewrite is: callers hand in ``build(enabled)``, which
returns the graph with the rewrite applied to the ``enabled`` layer indices only.

Accuracy-aware selection (:func:`select_float_layers_by_metric`) ranks layers the same way but
lets the user's own metric (``compile(..., evaluate=, max_metric_drop=)``) decide how many of the
most sensitive ones stay in float: drift is cheap and ranks well, the metric is what users ship on.

Every per-layer sensitivity trial and every metric trial goes through one *trial map*,
``map(function, items) -> list``: in this process by default, or the ``map_calls`` of the
executor a compile was given (``CompileOptions(executor=)``; fxcompress.sweeps: Ray ships each
trial to a worker), bound with :func:`trials_through` for that compile only (a context variable,
so compiles in other threads keep their own).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from fxcompress.fidelity import OutputMask, output_masks
from fxcompress.numerics import compare_outputs, flatten_outputs, worst_drift

Build = Callable[[Sequence[int]], nn.Module]
TrialMap = Callable[[Callable[[Any], Any], list], list]

_TRIAL_MAP: contextvars.ContextVar[TrialMap | None] = contextvars.ContextVar("sensitivity_trial_map", default=None)
#: (output_mask, input names, output names) of the compile run: which output positions drift counts
_MASKING: contextvars.ContextVar[tuple[OutputMask, Sequence[str], Sequence[str] | None] | None] = contextvars.ContextVar(
    "sensitivity_masking", default=None)


@contextlib.contextmanager
def masked_by(output_mask: OutputMask, input_names: Sequence[str], output_names: Sequence[str] | None = None) -> Iterator[None]:
    """Drift in this block counts only the output positions ``output_mask`` keeps (fxcompress.fidelity),
    as the compile's own drift does: padded positions must not rank a layer as sensitive."""
    token = _MASKING.set((output_mask, list(input_names), output_names))
    try:
        yield
    finally:
        _MASKING.reset(token)


def batch_masks(batches: Sequence[tuple[torch.Tensor, ...]], expected: Sequence[Sequence[Any]]) -> list[list[Any]] | None:
    """One mask list per batch (None per output where none applies), from the bound masking; None without one.

    Computed in-process, before trials may ship to other workers (the masks travel as arrays).
    """
    masking = _MASKING.get()
    if masking is None:
        return None
    output_mask, input_names, output_names = masking
    if not batches or len(input_names) != len(batches[0]):  # batches of another form than the compile's inputs
        return None
    return [output_masks(output_mask, input_names, batch, [torch.from_numpy(o) for o in outputs], output_names)
            for batch, outputs in zip(batches, expected)]


@contextlib.contextmanager
def trials_through(trial_map: TrialMap | None) -> Iterator[None]:
    """Run the trials of this block through ``trial_map(function, items)`` (None: in-process)."""
    token = _TRIAL_MAP.set(trial_map)
    try:
        yield
    finally:
        _TRIAL_MAP.reset(token)


def map_trials(function: Callable[[Any], Any], items: Sequence[Any]) -> list:
    """``[function(item) for item in items]``, through the bound trial map if there is one."""
    trial_map = _TRIAL_MAP.get()
    return [function(item) for item in items] if trial_map is None else list(trial_map(function, list(items)))


def drift_on_batches(reference: nn.Module | list, candidate: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]],
                     masks: Sequence[Sequence[Any]] | None = None) -> float:
    """Worst drift of ``candidate`` over ``batches``; ``reference`` is a module or its flattened outputs per batch.

    ``masks``: one mask list per batch (:func:`batch_masks`); the drift is then over the positions
    they keep. Without, the compile's masking bound by :func:`masked_by` applies (in-process only).
    """
    expected = reference_outputs(reference, batches) if isinstance(reference, nn.Module) else reference
    if masks is None:
        masks = batch_masks(batches, expected)
    worst = 0.0
    with torch.no_grad():
        for i, (batch, ref) in enumerate(zip(batches, expected)):
            got = flatten_outputs(candidate(*batch))
            worst = max(worst, worst_drift(compare_outputs(ref, got, masks[i] if masks is not None else None)))
    return worst


def reference_outputs(module: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> list:
    """The flattened outputs of ``module`` on each batch (computed once, compared many times)."""
    with torch.no_grad():
        return [flatten_outputs(module(*batch)) for batch in batches]


def layer_sensitivities(reference: nn.Module, build: Build, layers: Sequence[int],
                        batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[int, float]:
    """Drift of the model with only layer ``i`` rewritten, for every ``i`` in ``layers``."""
    expected = reference_outputs(reference, batches)
    masks = batch_masks(batches, expected)
    layers = list(layers)
    return dict(zip(layers, map_trials(lambda i: drift_on_batches(expected, build([i]), batches, masks), layers)))


def select_float_layers(reference: nn.Module, build: Build, sensitivity: dict[int, float], layers: Sequence[int],
                        batches: Sequence[tuple[torch.Tensor, ...]], max_drift: float) -> tuple[list[int], float]:
    """The fewest most-sensitive layers to keep unrewritten so that drift <= ``max_drift``.

    Layers are ranked by sensitivity; the number kept in float is found by binary search (drift
    is close to monotone in it), so this costs O(log n) evaluations, not n. Returns the layers
    kept in float and the drift of the resulting mix (on ``batches``).
    """
    expected = reference_outputs(reference, batches)
    masks = batch_masks(batches, expected)
    ranked = sorted(layers, key=lambda i: sensitivity.get(i, 0.0), reverse=True)

    def drift_keeping(k: int) -> float:
        return drift_on_batches(expected, build(ranked[k:]), batches, masks)

    full = drift_keeping(0)
    if full <= max_drift:
        return [], full
    low, high = 0, len(ranked)  # drift_keeping(low) > budget; high: every layer in float (drift 0)
    drifts = {0: full, len(ranked): 0.0}
    while high - low > 1:
        mid = (low + high) // 2
        drifts[mid] = drift_keeping(mid)
        if drifts[mid] <= max_drift:
            high = mid
        else:
            low = mid
    return ranked[:high], drifts[high]


@dataclass(frozen=True)
class MetricTrial:
    """One evaluation of the user's metric: ``float_layers`` most sensitive layers kept in float."""

    float_layers: int
    metric: float
    drop: float
    accepted: bool


def select_float_layers_by_metric(build: Build, ranked: Sequence[int], drop_of: Callable[[nn.Module], tuple[float, float]],
                                  max_drop: float,
                                  on_trial: Callable[[MetricTrial], None] = lambda trial: None,
                                  ) -> tuple[list[int], list[MetricTrial]]:
    """The fewest of the ``ranked`` layers (most sensitive first) to keep unrewritten so that the
    metric drop is at most ``max_drop``.

    ``drop_of(module)`` returns ``(metric, baseline - metric)``. First every layer is rewritten;
    if that is within budget nothing stays in float (one trial). Otherwise a binary search over
    how many of the ranked layers stay in float, assuming (as the drift search does) that the
    drop shrinks as more layers stay in float; keeping all of them rewrites nothing, which is
    taken as within budget without a trial. At most ``2 + log2(len(ranked))`` evaluations.
    Returns the layers kept in float and every trial, in the order they ran.
    """
    trials: list[MetricTrial] = []

    def trial(k: int) -> bool:
        ((metric, drop),) = map_trials(lambda kept: drop_of(build(ranked[kept:])), [k])
        accepted = drop <= max_drop
        trials.append(MetricTrial(k, metric, drop, accepted))
        on_trial(trials[-1])
        return accepted

    if trial(0):
        return [], trials
    low, high = 0, len(ranked)  # trial(low) failed; keeping ``high`` layers in float rewrites nothing
    while high - low > 1:
        mid = (low + high) // 2
        if trial(mid):
            high = mid
        else:
            low = mid
    return list(ranked[:high]), trials


def report_trial(trial: MetricTrial) -> None:
    """Print one metric trial (the accuracy-aware search's progress when ``progress=True``)."""
    verdict = "within budget" if trial.accepted else "over budget"
    print(f"[fxcompress] metric trial: {trial.float_layers} layer(s) in float -> metric {trial.metric:.6g}, "
          f"drop {trial.drop:.4g} ({verdict})", file=sys.stderr, flush=True)
