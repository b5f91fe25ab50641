"""Built-in instruments: Timing, RecordDiff, VerifyNumerics, DumpIR, PrintAfterChange."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import IO, Any, Sequence

import torch
from torch import fx

from fxcompress.errors import InputError
from fxcompress.infra.instrument import Instrument, PassRecord, RollbackPass
from fxcompress.infra.pass_base import Pass, PassResult
from fxcompress.analysis.graph_diff import GraphDiff, diff_snapshots
from fxcompress.analysis.snapshot import GraphSnapshot
from fxcompress.numerics import LOSSLESS_TOLERANCE, compare_outputs, flatten_outputs, signature, worst_drift, worst_unmasked_drift


class Timing(Instrument):
    """Wall-clock seconds of each pass, stored in ``record.seconds``."""

    def before_pass(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        record.extra["_t0"] = time.perf_counter()

    def _stop(self, record: PassRecord) -> None:
        start = record.extra.pop("_t0", None)
        if start is not None:
            record.seconds = time.perf_counter() - start

    def after_pass(self, pass_: Pass, graph_module: fx.GraphModule, result: PassResult, record: PassRecord) -> None:
        self._stop(record)

    def after_rollback(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        self._stop(record)

    def after_pass_failed(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        self._stop(record)


# PassRecord.extra key: RecordDiff appended a snapshot for this pass (undone if it is rolled back).
_SNAPSHOTTED = "record_diff_snapshotted"


class RecordDiff(Instrument):
    """Snapshot the graph before the pipeline and after every pass that changed it.

    ``snapshots[0]`` is the captured graph; each changed pass appends one labelled with its
    name. ``diff(a, b)`` compares any two. Node and parameter counts go into the records.
    """

    def __init__(self) -> None:
        self.snapshots: list[GraphSnapshot] = []
        self._current: GraphSnapshot | None = None

    def before_pipeline(self, graph_module: fx.GraphModule) -> None:
        self._current = GraphSnapshot.of(graph_module, "captured")
        self.snapshots = [self._current]

    def before_pass(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        if self._current is None:  # used on a nested manager without before_pipeline
            self.before_pipeline(graph_module)
        record.nodes_before = len(self._current.compute_nodes)
        record.params_before = self._current.parameters

    def after_pass(self, pass_: Pass, graph_module: fx.GraphModule, result: PassResult, record: PassRecord) -> None:
        if result.modified:
            after = GraphSnapshot.of(graph_module, record.name)
            record.extra["diff"] = diff_snapshots(self._current, after)
            record.extra[_SNAPSHOTTED] = True
            self.snapshots.append(after)
            self._current = after
        record.nodes_after = len(self._current.compute_nodes)
        record.params_after = self._current.parameters

    def after_rollback(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        # A later instrument (VerifyNumerics) may roll back a pass after our after_pass took its
        # snapshot: drop that snapshot so that the next diff starts from the graph that was kept.
        if record.extra.pop(_SNAPSHOTTED, False):
            self.snapshots.pop()
            self._current = self.snapshots[-1]
            record.extra.pop("diff", None)
        record.nodes_after, record.params_after = record.nodes_before, record.params_before

    def snapshot(self, label: str) -> GraphSnapshot:
        """The snapshot with ``label`` ('captured' or a pass name; the last one if repeated)."""
        for snap in reversed(self.snapshots):
            if snap.label == label:
                return snap
        labels = [s.label for s in self.snapshots]
        raise KeyError(f"no snapshot {label!r}; recorded: {labels}")

    def diff(self, before: str, after: str) -> GraphDiff:
        return diff_snapshots(self.snapshot(before), self.snapshot(after))


class VerifyNumerics(Instrument):
    """Run the graph on the example inputs after each changed pass and compare with the reference.

    A lossless pass whose drift exceeds ``lossless_tolerance``, or any pass that changes the
    outputs' count, shapes or dtypes, is rolled back (RollbackPass). Lossy passes only have
    their drift recorded; the pipeline's overall tolerance is enforced by the caller.

    ``masks`` (one boolean array or None per output, fxcompress.fidelity.output_masks): the
    recorded drift is over the positions they keep, as the whole-model drift is; the lossless
    check stays over every position (a lossless pass must not change even padded positions).
    """

    def __init__(
        self,
        inputs: Sequence[torch.Tensor],
        reference_outputs: Any,
        lossless_tolerance: float = LOSSLESS_TOLERANCE,
        masks: Sequence[Any] | None = None,
    ) -> None:
        self.inputs = tuple(inputs)
        self.reference = flatten_outputs(reference_outputs)
        self.lossless_tolerance = lossless_tolerance
        self.last_drift = 0.0
        self.masks = masks
        #: seconds spent running and comparing the graph, over all passes (the report's "verification")
        self.seconds = 0.0

    def after_pass(self, pass_: Pass, graph_module: fx.GraphModule, result: PassResult, record: PassRecord) -> None:
        if not result.modified:
            return
        start = time.perf_counter()
        try:
            self._check(pass_, graph_module, record)
        finally:
            self.seconds += time.perf_counter() - start

    def _check(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        try:
            with torch.no_grad():
                # Clones: a graph that mutates its inputs in place must see the same values every pass.
                outputs = flatten_outputs(graph_module(*(t.clone() for t in self.inputs)))
        except Exception as exc:  # noqa: BLE001 - a graph that no longer runs is rolled back
            raise RollbackPass(f"graph no longer runs: {type(exc).__name__}: {exc}") from None
        if signature(outputs) != signature(self.reference):
            raise RollbackPass(f"outputs changed from {signature(self.reference)} to {signature(outputs)}")
        comparisons = compare_outputs(self.reference, outputs, self.masks)
        drift = record.drift = worst_drift(comparisons)
        whole = worst_unmasked_drift(comparisons)
        if pass_.lossless and not whole <= self.lossless_tolerance:
            raise RollbackPass(
                f"lossless pass drifted {whole:.2e} from the original outputs (allowed {self.lossless_tolerance:.0e})"
            )
        self.last_drift = drift


def safe_filename(name: str) -> str:
    """``name`` (a pass name, maybe nested: ``int8/fold-batchnorm``) as a file name: the stem of every per-pass dump."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class DumpIR(Instrument):
    """Write the graph after every changed pass to ``NNN_<pass>.txt`` in ``directory``.

    The captured graph is ``000_captured.txt``. When a pass raises, its *input* graph is written
    to ``NNN_<pass>.crash.txt`` so the failure can be reproduced.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.count = 0
        # Fail before any pass runs (not halfway through the pipeline) if the folder is unusable.
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not os.access(self.directory, os.W_OK):
                raise PermissionError(13, "not writable")
        except OSError as exc:
            raise InputError(f"The dump folder {self.directory} cannot be used ({exc.strerror or exc}).",
                             "give dump_dir (--dump-dir) a folder that exists or can be created, and is writable.") from None

    def _write(self, graph_module: fx.GraphModule, label: str, suffix: str = ".txt") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.count:03d}_{safe_filename(label)}{suffix}"
        path.write_text(f"# {label}\n{graph_module.graph}\n\n# generated code\n{graph_module.code}")
        self.count += 1

    def before_pipeline(self, graph_module: fx.GraphModule) -> None:
        self.count = 0
        self._write(graph_module, "captured")

    def after_pass(self, pass_: Pass, graph_module: fx.GraphModule, result: PassResult, record: PassRecord) -> None:
        if result.modified:
            self._write(graph_module, record.name)

    def after_pass_failed(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        self._write(graph_module, record.name, ".crash.txt")


class PrintAfterChange(Instrument):
    """Print a one-line diff summary after each pass that changed the graph."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self._before: GraphSnapshot | None = None

    def before_pass(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        self._before = GraphSnapshot.of(graph_module, "before")

    def after_pass(self, pass_: Pass, graph_module: fx.GraphModule, result: PassResult, record: PassRecord) -> None:
        if result.modified and self._before is not None:
            after = GraphSnapshot.of(graph_module, record.name)
            print(f"[{record.name}] {diff_snapshots(self._before, after).to_text()}", file=self.stream)




class PassProgress(Instrument):
    """A progress bar on stderr over the passes of a compile (tqdm): the pass running now, how
    many ran, and for how long. What the CLI shows while compiling when a person watches."""

    def __init__(self, description: str = "passes") -> None:
        self.description = description
        self._bar: Any = None

    def before_pipeline(self, graph_module: fx.GraphModule) -> None:
        from tqdm.auto import tqdm

        self._close()
        self._bar = tqdm(desc=self.description, unit="pass", leave=False)

    def before_pass(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(record.name, refresh=True)

    def after_pass(self, pass_: Pass, graph_module: fx.GraphModule, result: PassResult, record: PassRecord) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def after_rollback(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        self.after_pass(pass_, graph_module, None, record)  # type: ignore[arg-type]

    def after_pass_failed(self, pass_: Pass, graph_module: fx.GraphModule, record: PassRecord) -> None:
        self._close()

    def after_pipeline(self, graph_module: fx.GraphModule, records: Sequence[PassRecord]) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
