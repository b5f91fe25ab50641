"""Instrument hooks: code that observes or vets passes without living inside them.

Modelled on TVM's pass instruments and MLIR's pass instrumentation. All hooks are optional.
An instrument that rejects a pass's result raises :class:`RollbackPass` from ``after_pass``;
the manager then restores the graph from before the pass and records the reason. Every hook
receives the :class:`PassRecord` of the pass run it observes, which instruments fill in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from torch import fx

from fxcompress.infra.pass_base import Rejection

if TYPE_CHECKING:
    from fxcompress.infra.pass_base import Pass, PassResult


@dataclass
class PassRecord:
    """What happened in one run of one pass; instruments fill in the measured fields."""

    name: str
    iteration: int
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    rolled_back: str | None = None
    seconds: float | None = None
    drift: float | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    exports_exactly: bool = True  # Pass.exports_exactly of the pass that ran
    extra: dict[str, Any] = field(default_factory=dict)


class RollbackPass(Exception):
    """Raised by an instrument to undo the pass that just ran; ``reason`` goes into its record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Instrument:
    """Base class with no-op hooks; override the ones you need."""

    def before_pipeline(self, graph_module: fx.GraphModule) -> None:
        """Called once before the outermost manager runs its first pass."""

    def after_pipeline(self, graph_module: fx.GraphModule, records: Sequence["PassRecord"]) -> None:
        """Called once after the outermost manager finished."""

    def should_run(self, pass_: "Pass", graph_module: fx.GraphModule) -> bool:
        """Return False to skip ``pass_`` (every instrument must agree to run it)."""
        return True

    def before_pass(self, pass_: "Pass", graph_module: fx.GraphModule, record: "PassRecord") -> None:
        """Called before each pass with the graph it will receive."""

    def after_pass(
        self, pass_: "Pass", graph_module: fx.GraphModule, result: "PassResult", record: "PassRecord"
    ) -> None:
        """Called after a pass succeeded (graph linted and recompiled if modified)."""

    def after_rollback(self, pass_: "Pass", graph_module: fx.GraphModule, record: "PassRecord") -> None:
        """Called after a pass was rolled back; ``graph_module`` is the restored graph."""

    def after_pass_failed(self, pass_: "Pass", graph_module: fx.GraphModule, record: "PassRecord") -> None:
        """Called when a pass raised; ``graph_module`` is its input graph (for crash dumps)."""
