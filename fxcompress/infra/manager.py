"""The PassManager: an ordered pipeline of passes that is itself a pass.

It runs passes in order, optionally repeats the sequence until no pass reports a change (fixed
point), lints and recompiles after every pass that changed something, and wraps failures with
context ("pass X failed after [A, B]"). Before each pass it snapshots the graph module, so a pass
that raises, or that an instrument rejects (:class:`RollbackPass`), leaves the previous graph
intact. The snapshot copies the graph, not the weights: it shares every tensor with the module the
pass receives, and a :class:`~fxcompress.infra.weights.WriteGuard` saves a tensor's bytes before
a pass (or an instrument's run of the graph) first writes into it in place, so the snapshot is
put back exactly and a kept pass's in-place writes land in copies of its own. Instruments are handed to the manager explicitly; a nested manager also runs its
parent's instruments, so per-pass records cover the whole tree.
"""

from __future__ import annotations

from typing import Sequence

from torch import fx

from fxcompress.errors import FxCompressError, PassError
from fxcompress.infra.instrument import Instrument, PassRecord, RollbackPass
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import Pass, PassResult
from fxcompress.infra.weights import WriteGuard, module_tensors, release, sharing_copy


class PassManager(Pass):
    """Run ``passes`` in order; see the module docstring.

    Args:
        passes: Pass instances (a PassManager may be one of them: managers nest).
        name: shown in records of nested passes as ``name/pass``.
        max_iterations: 1 runs the sequence once; more repeats it until no pass changes the graph.
        instruments: hooks run around every pass (timing, diffs, numerics, dumps).
    """

    name = "pipeline"

    def __init__(
        self,
        passes: Sequence[Pass],
        name: str = "pipeline",
        max_iterations: int = 1,
        instruments: Sequence[Instrument] = (),
    ) -> None:
        self.pipeline_name = name
        super().__init__()
        if max_iterations < 1:
            raise ValueError("max_iterations must be >= 1")
        self.passes = list(passes)
        self.max_iterations = max_iterations
        self.instruments = list(instruments)
        #: Records of the most recent call, in execution order.
        self.records: list[PassRecord] = []
        #: Whether the last run reached a fixed point (or ran its single round), at every level.
        self.converged: bool = True

    @property
    def display_name(self) -> str:
        return self.pipeline_name

    def bind(self, context: "CompileContext") -> None:
        """Hand the context to every pass, nested managers included."""
        for p in self.passes:
            p.bind(context)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.records = []
        for inst in self.instruments:
            inst.before_pipeline(graph_module)
        graph_module, modified = self._run(graph_module, self.instruments, self.records, prefix="")
        for inst in self.instruments:
            inst.after_pipeline(graph_module, self.records)
        return PassResult(graph_module, modified, stats={"passes_run": len(self.records)})

    def _run(
        self,
        graph_module: fx.GraphModule,
        instruments: Sequence[Instrument],
        records: list[PassRecord],
        prefix: str,
    ) -> tuple[fx.GraphModule, bool]:
        modified_any = False
        self.converged = False
        for iteration in range(self.max_iterations):
            changed = False
            for p in self.passes:
                if isinstance(p, PassManager):
                    graph_module, sub_changed = p._run(
                        graph_module, [*instruments, *p.instruments], records, f"{prefix}{p.pipeline_name}/"
                    )
                    changed |= sub_changed
                    continue
                if not all(inst.should_run(p, graph_module) for inst in instruments):
                    continue
                graph_module, pass_changed = self._run_one(
                    p, graph_module, instruments, records, f"{prefix}{p.display_name}", iteration
                )
                changed |= pass_changed
            modified_any |= changed
            if not changed:
                self.converged = True
                break
        if self.max_iterations == 1:
            self.converged = True
        # A pipeline has converged only if every pipeline nested in it has too.
        self.converged = self.converged and all(p.converged for p in self.passes if isinstance(p, PassManager))
        return graph_module, modified_any

    def _run_one(
        self,
        p: Pass,
        graph_module: fx.GraphModule,
        instruments: Sequence[Instrument],
        records: list[PassRecord],
        name: str,
        iteration: int,
    ) -> tuple[fx.GraphModule, bool]:
        record = PassRecord(name=name, iteration=iteration, exports_exactly=p.exports_exactly)
        ran_before = [r.name for r in records if r.rolled_back is None]
        shared = module_tensors(graph_module)
        snapshot = sharing_copy(graph_module, shared)
        guard = WriteGuard(shared)
        for inst in instruments:
            inst.before_pass(p, graph_module, record)
        try:
            with guard:
                result = p(graph_module)
                out = result.graph_module
                if result.modified:
                    out.graph.lint()
                    out.recompile()
                record.modified = result.modified
                record.stats = dict(result.stats)
                record.rejections = list(result.rejections)
                for inst in instruments:
                    inst.after_pass(p, out, result, record)
        except RollbackPass as rollback:
            guard.restore()
            record.rolled_back = rollback.reason
            record.modified = False
            for inst in instruments:
                inst.after_rollback(p, snapshot, record)
            records.append(record)
            return snapshot, False
        except FxCompressError:
            guard.restore()
            for inst in instruments:
                inst.after_pass_failed(p, snapshot, record)
            raise
        except Exception as exc:
            guard.restore()
            for inst in instruments:
                inst.after_pass_failed(p, snapshot, record)
            error = PassError(name, ran_before, f"{type(exc).__name__}: {exc}")
            error.last_good = snapshot  # the graph from before the failing pass
            raise error from exc
        # Kept: in-place writes move into copies of the output's own; the snapshot lets go of
        # its tensors now, so weights the pass replaced are freed without waiting for the collector.
        guard.keep_writes(out)
        release(snapshot)
        records.append(record)
        return out, result.modified
