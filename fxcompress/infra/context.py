"""CompileContext: what a compile run knows besides the graph (inputs, calibration data, the user's metric).

Passes that need data (calibration for quantization, sensitivity analysis) read it from the
context the manager hands them through :meth:`Pass.bind`; all other passes ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import math

import torch

from fxcompress.calibration import Calibration
from fxcompress.errors import InputError


class UserMetric:
    """The user's own quality metric (``compile(..., evaluate=, max_metric_drop=)``).

    ``evaluate(module)`` scores a module on the user's data, higher is better (accuracy, F1,
    negative loss). Every call is checked: an exception or a result that is not a finite number
    becomes an InputError naming the call, so a broken metric never looks like a bad model.
    """

    def __init__(self, evaluate: Callable[[Any], Any], max_drop: float | None = None) -> None:
        if not callable(evaluate):
            raise InputError(f"evaluate must be a callable that scores a module, got {type(evaluate).__name__}.",
                             "pass evaluate=lambda module: accuracy(module, my_data) (higher is better).")
        if max_drop is not None and not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
            raise InputError(f"max_metric_drop must be a finite number >= 0, got {max_drop!r}.",
                             "give the largest acceptable drop of your metric, e.g. max_metric_drop=0.005 for half a point of accuracy.")
        self.evaluate = evaluate
        self.max_drop = max_drop
        self.baseline: float | None = None
        #: turns a candidate graph module into what ``evaluate`` calls (the model's own call form,
        #: for models taking keyword inputs); identity by default
        self.as_user_module: Callable[[Any], Any] = lambda module: module

    def score(self, module: Any, what: str) -> float:
        """``evaluate(module)`` as a float; InputError if it raises or returns no finite number."""
        try:
            with torch.no_grad():
                value = self.evaluate(module)
        except Exception as exc:  # the user's code: report it as theirs, with its own message
            raise InputError(f"evaluate raised {type(exc).__name__} while scoring {what}: {exc}.",
                             "make evaluate(module) call the module the way you call your model and return a number "
                             "(higher is better).") from exc
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"evaluate returned {value!r} for {what}, not a finite number.",
                             "return one number from evaluate(module), higher is better (e.g. accuracy as a float).")
        return float(value)

    def drop_of(self, module: Any) -> tuple[float, float]:
        """``(metric, baseline - metric)`` of a candidate module."""
        assert self.baseline is not None, "the baseline is scored before any pass runs"
        metric = self.score(self.as_user_module(module), "a candidate compiled module")
        return metric, self.baseline - metric


@dataclass
class CompileContext:
    """Inputs and data shared by the passes of one compile run.

    Attributes:
        example_inputs: the tuple of tensors the model was captured with.
        calibration: the run's :class:`~fxcompress.calibration.Calibration` (empty when none was
            given); passes ask it for batches with ``calibration.take(graph_module, name, limit)``.
            Anything ``compile(calibration=)`` takes is accepted here too and normalised against
            ``example_inputs``.
        reference_outputs: the original model's outputs on ``example_inputs``.
        progress: whether passes may show progress bars.
        metric: the user's metric with its baseline (the original model's score), or None;
            lossy passes that can keep layers in float search with it (accuracy-aware compile).
    """

    example_inputs: tuple[torch.Tensor, ...]
    calibration: Calibration | Any = None
    reference_outputs: Any = None
    progress: bool = False
    metric: UserMetric | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, Calibration):
            self.calibration = Calibration(self.calibration, self.example_inputs)
