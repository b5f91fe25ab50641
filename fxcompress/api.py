"""The public Python API: compile(), CompileOptions, CompileResult, CompileReport, diff().

    result = fxcompress.compile(model, example_inputs, recipe="default")
    result.module              # torch.fx.GraphModule, callable like the model, trainable
    result.report              # per pass: name, modified, nodes/params before/after, seconds, drift
    result.export_onnx(path)   # checked ONNX file (parity-verified against result.module)
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn

from fxcompress.capture import (
    capture, check_finite_outputs, holding_tracing_lock, longer_sequences, other_size, private_copy, run_eager,
)
from fxcompress.inputs import FlatCall, ModelCall, StructuredModule, model_call
from fxcompress.errors import CaptureError, DriftError, ExportError, InputError
from fxcompress.export.atomic import check_output_path
from fxcompress.export.external import externalize, load_inline, save_external_model
from fxcompress.export.onnx_export import drop_unused_inputs, export_model_proto, save_model, set_metadata
from fxcompress.graph_meta import INPUT_NAMES_PROP
from fxcompress.fidelity import (
    Gate, MaskedFigures, OutputMask, check_gate, check_output_mask, fidelity_table, output_fidelity,
    output_masks, output_tensors,
)
from fxcompress.export.sparse import bake_weight_masks, compress_initializers
from fxcompress.infra.cost import check_memory
from fxcompress.calibration import Calibration
from fxcompress.infra.context import CompileContext, UserMetric
from fxcompress.infra.instrument import Instrument, PassRecord
from fxcompress.infra.instruments import DumpIR, RecordDiff, Timing, VerifyNumerics
from fxcompress.infra.pass_base import Pass
from fxcompress.infra.recipe import Recipe, resolve_recipe
from fxcompress.infra.weights import SharedWeights, collect
from fxcompress.analysis.graph_stats import count_compute_nodes, count_parameters
from fxcompress.analysis.sensitivity import masked_by, trials_through
from fxcompress.numerics import (LOSSLESS_TOLERANCE, OutputComparison, compare_outputs, flatten_outputs, half_parity_floor,
                                 model_float_dtype)
from fxcompress.inspect.pass_table import pass_rows, print_table, render_plain
from fxcompress.runtime.parity import ParityReport, validate as validate_onnx
from fxcompress.runtime.session import create_session

if TYPE_CHECKING:
    import onnx


#: ONNX metadata key naming the inputs export dropped from a file because no node reads them.
DROPPED_INPUTS_KEY = "fxcompress_dropped_inputs"


@dataclass
class CompileReport(MaskedFigures):
    """What a compile run did: one record per pass run, plus whole-model figures.

    ``drift`` is the figure checked against ``tolerance``: where an output mask applies (padded
    positions excluded by an ``attention_mask``, or compile's ``output_mask``) it is over the
    positions the mask keeps, and ``unmasked_drift`` gives the figure over every position beside
    it. Both are read off ``outputs``, which has one :class:`~fxcompress.numerics.OutputComparison`
    per output (drift, relative RMS error, cosine, ...; the masked figures under ``masked``).
    """

    recipe: str
    records: list[PassRecord]
    tolerance: float
    seconds: float
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    converged: bool = True
    parity: ParityReport | None = None
    #: with ``evaluate=``: {"baseline", "compiled", "drop", "max_drop"} of the user's metric
    metric: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: per output, against the original: the figures over the whole output, and over the positions
    #: an output mask keeps under ``masked`` (``judged``: the ones the bounds check)
    outputs: list[OutputComparison] = field(default_factory=list)
    #: set when the recipe's lossy passes changed nothing, with the reason ("no linear layers for int8-dynamic; try int8")
    note: str | None = None
    #: wall seconds by stage: capture, passes, verification, pipeline (snapshots, lint, diffs),
    #: final check; export and parity are added by each export (docs/cost.md)
    stages: dict[str, float] = field(default_factory=dict)

    def stages_text(self) -> str:
        """Where the time went, one line: ``Time: capture 12.1 s, passes 3.0 s, ...``."""
        return "Time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stages.items())
    #: the acceptance bounds the result was checked against (``tolerance`` is its drift bound)
    gate: Gate | None = None

    def fidelity_text(self) -> str:
        """The per-output figures against the original as aligned text."""
        whole = f" (all positions: {self.unmasked_drift:.2e})" if self.masked and self.unmasked_drift is not None else ""
        masked = " over the positions the output mask keeps" if self.masked else ""
        bounds = f"bounds: {self.gate.describe()}" if self.gate is not None else f"tolerance {self.tolerance:.1e}"
        return (f"Outputs vs the original: drift {self.drift:.2e}{masked}{whole}, {bounds}\n"
                + fidelity_table(self.outputs))

    def to_text(self) -> str:
        """The per-pass table followed by the per-output figures and where the time went."""
        return self.table() + "\n" + self.fidelity_text() + ("\n" + self.stages_text() if self.stages else "")

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): whole-model figures, per-output figures, parity and passes."""
        return {
            "recipe": self.recipe, "drift": self.drift, "unmasked_drift": self.unmasked_drift, "masked": self.masked,
            "tolerance": self.tolerance, "gate": self.gate.to_dict() if self.gate is not None else None,
            "seconds": self.seconds, "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after, "params_before": self.params_before, "params_after": self.params_after,
            "converged": self.converged, "metric": self.metric, "note": self.note,
            "outputs": [o.to_dict() for o in self.outputs],
            "parity": self.parity.to_dict() if self.parity is not None else None,
            "stages": dict(self.stages),
            "passes": [{"name": r.name, "iteration": r.iteration, "modified": r.modified, "seconds": r.seconds,
                        "drift": r.drift, "rolled_back": r.rolled_back} for r in self.records],
        }

    @property
    def rolled_back(self) -> list[PassRecord]:
        """Records of passes an instrument undid (e.g. a lossless pass that drifted)."""
        return [r for r in self.records if r.rolled_back]

    def _total_row(self) -> tuple[str, ...]:
        return ("total", "", "", f"{self.nodes_before}->{self.nodes_after}",
                f"{self.params_before:,}->{self.params_after:,}", f"{self.seconds * 1000:.1f}", f"{self.drift:.1e}",
                "" if self.converged else "did not reach a fixed point")

    def table(self) -> str:
        """The per-pass table as plain aligned text: each pass once per pipeline, with its rounds."""
        return render_plain(pass_rows(self.records), self._total_row())

    def print_table(self, stream: IO[str] | None = None) -> None:
        """Print the per-pass table (drawn with rich on a terminal, plain text otherwise)."""
        print_table(pass_rows(self.records), self._total_row(), stream)


@dataclass(frozen=True)
class CompileOptions:
    """The settings of :func:`compile` that most compiles leave at their defaults, in one object.

    ``compile``'s own keywords are what a user changes from one compile to the next: the recipe,
    calibration data, the acceptance bounds (``tolerance``, ``output_mask``) and an accuracy
    metric. These options decide how the graph is captured (symbolic axes), what is recorded on
    the way (instruments, IR dumps) and where the accuracy-aware search runs its trials::

        fxcompress.compile(model, example, "int8", calibration=data,
                           options=fxcompress.CompileOptions(dynamic_batch=True, dump_dir="out/ir"))

    Attributes:
        dynamic_batch: capture with a symbolic batch dimension so the ONNX batch axis is dynamic
            (needs an example batch of at least 2).
        dynamic_sequence: also make dim 1 of every ``[batch, sequence]`` input (token ids, masks)
            symbolic: one graph and one ONNX file for every sequence length; export parity is
            then also checked at a second, longer length.
        dynamic_axes: any input axes to make symbolic, by input name: ``{"pixel_values": {2:
            "height", 3: "width"}}``; captured symbolic and exported under those dimension
            names (instead of ``dynamic_batch`` / ``dynamic_sequence``).
        instruments: extra instruments run around every pass.
        dump_dir: if set, the graph after every changed pass is written there (DumpIR).
        executor: where the per-layer sensitivity and metric trials of the accuracy-aware search
            (``evaluate=`` with ``max_metric_drop=``) run: an executor of :mod:`fxcompress.sweeps`
            (e.g. ``RayExecutor``, one Ray task per trial); default: in this process, one after another.
    """

    dynamic_batch: bool = False
    dynamic_sequence: bool = False
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None
    instruments: Sequence[Instrument] = ()
    dump_dir: str | os.PathLike | None = None
    executor: Any = None


class CompileResult:
    """The outcome of :func:`compile`.

    Attributes:
        module: the compiled ``torch.fx.GraphModule``; call it like the model, or fine-tune it.
            Until its first use the result shares the weights no pass changed with your model
            (export needs no second copy of them, docs/cost.md); reading ``module`` (or
            ``graph_module``) gives it its own copy first, so training it never changes your model.
        report: a :class:`CompileReport`.
        recipe: the resolved Recipe that ran.
        example_inputs: the inputs the model was captured with.
        snapshots: the RecordDiff instrument (graph snapshot after every changed pass).
        dynamic_axes: the symbolic input axes compile was given (``dynamic_axes=``), or None.
    """

    def __init__(self, module: fx.GraphModule, report: CompileReport, recipe: Recipe,
                 example_inputs: tuple[torch.Tensor, ...], snapshots: RecordDiff, options: CompileOptions,
                 call: ModelCall | None = None, tolerance: Any = None,
                 output_mask: OutputMask = None, calibration: Calibration | None = None,
                 shared_weights: SharedWeights | None = None) -> None:
        # A model called with keyword or nested inputs gets a module called the same way, over
        # the compiled graph (shared parameters: fine-tune either, export sees the change).
        self._module = StructuredModule(module, call) if call is not None and call.structured else module
        #: the user's tensors the graph still shares (None once it owns its weights)
        self._shared_weights = shared_weights
        self.report = report
        self.recipe = recipe
        self.example_inputs = example_inputs
        self.snapshots = snapshots
        self.dynamic_batch = options.dynamic_batch
        self.dynamic_sequence = options.dynamic_sequence
        self.dynamic_axes = dict(options.dynamic_axes) if options.dynamic_axes else None
        self.call = call
        #: the acceptance bounds compile was given (argument merged over the recipe's); export parity honours them
        self.gate = recipe.gate.merged(tolerance)
        #: the drift bound of :attr:`gate` (what ``tolerance`` was, as a number)
        self.tolerance = self.gate.drift
        #: compile's :class:`~fxcompress.calibration.Calibration`: export parity runs on its first batches
        self.calibration = calibration if calibration is not None else Calibration(None, example_inputs)
        #: the output mask compile was given (None: automatic); export parity and compare honour it
        self.output_mask = output_mask

    @property
    def model_inputs(self) -> Any:
        """The example inputs in the form the original model takes (``(args, kwargs)`` for keyword inputs)."""
        return (self.call.args, self.call.kwargs) if self.call is not None and self.call.structured else self.example_inputs

    @property
    def module(self) -> nn.Module:
        """The compiled module, with its own copy of every weight (made on first access)."""
        self._own_weights()
        return self._module

    @property
    def graph_module(self) -> fx.GraphModule:
        """The compiled ``torch.fx.GraphModule`` over the flat input tensors (what export reads),
        with its own copy of every weight (made on first access)."""
        self._own_weights()
        return self._compiled_graph()

    def _own_weights(self) -> None:
        if self._shared_weights is not None:
            self._check_shared_weights()
            self._shared_weights.own()
            self._shared_weights = None

    def _check_shared_weights(self) -> None:
        """InputError if the user's model was changed in place while the result still shares its weights."""
        if self._shared_weights is None:
            return
        changed = self._shared_weights.changed()
        if changed:
            raise InputError(
                f"The model this result was compiled from changed after compile ({len(changed)} of the "
                f"{len(self._shared_weights.tensors)} weight tensors it shares with the result were written in place, "
                "e.g. by an optimizer step or load_state_dict), so the result no longer holds what was compiled and "
                "checked: until its first use, a compile's result shares the weights no pass changed with your "
                "model instead of copying them (docs/cost.md).",
                "compile again after changing the model, or read result.module once right after compile (the "
                "result then gets its own copy of the weights and your model is free to change).",
            )

    def _compiled_graph(self) -> fx.GraphModule:
        """The compiled graph, weights possibly still shared, for reading only (export and parity,
        which call :meth:`_check_shared_weights` once first)."""
        return self._module.graph_module if isinstance(self._module, StructuredModule) else self._module

    def __repr__(self) -> str:
        return (f"CompileResult(recipe={self.recipe.name!r}, nodes {self.report.nodes_before}->{self.report.nodes_after}, "
                f"drift {self.report.drift:.2e})")

    @holding_tracing_lock
    def export_proto(
        self,
        *,
        simplify: bool = False,
        dynamic_batch: bool | None = None,
        validate: bool = True,
        tolerance: float | None = None,
        metadata: dict[str, Any] | None = None,
        sparse: bool = False,
        output_mask: OutputMask = None,
        keep_unused_inputs: bool | None = None,
    ) -> "onnx.ModelProto":
        """Export ``module`` to a checked ONNX ``ModelProto`` in memory (what :meth:`export_onnx` writes,
        which keeps the weights on disk instead: docs/cost.md).

        Sparsity masks are baked into their weights; ``sparse=True`` also stores weights with
        enough zeros in a smaller encoding (fxcompress.export.sparse.compress_initializers).

        With ``validate`` (the default) the model is run in ORT (optimizations off) on the example
        inputs and the first calibration batches compile was given (real data, judged by the
        compile's bounds: drift, relative RMS error, cosine per output), then on random inputs of the
        same shapes judged against the real outputs' scale (fxcompress.runtime.parity), and compared
        with ``module``; a mismatch raises ExportError. ``tolerance`` (a number for the drift bound,
        or a dict of bounds as compile takes) overrides them. The parity figures, recipe and version
        are stored as metadata props.
        ``output_mask`` (default: compile's) says which output positions parity counts, as in
        :func:`fxcompress.compile`; where one applies the masked drift is the one checked.

        Inputs no node reads (an argument forward() never uses) are dropped from the file, named
        in its metadata and in ``report.extra["dropped_inputs"]``; ``keep_unused_inputs=True``
        keeps them as required inputs (a decoder's inputs are always kept: its feed layout is
        fixed). Every input name is recorded in the file, so fxcompress's runtime helpers
        (``validate``, ``benchmark``) take the same positional inputs either way.
        """
        return self._export(None, simplify=simplify, dynamic_batch=dynamic_batch, validate=validate, tolerance=tolerance,
                            metadata=metadata, sparse=sparse, output_mask=output_mask,
                            keep_unused_inputs=keep_unused_inputs)

    def _export(self, data_file: Path | None, *, simplify: bool = False, dynamic_batch: bool | None = None,
                validate: bool = True, tolerance: float | None = None, metadata: dict[str, Any] | None = None,
                sparse: bool = False, output_mask: OutputMask = None,
                keep_unused_inputs: bool | None = None) -> "onnx.ModelProto":
        """:meth:`export_proto`; with ``data_file`` (in a folder of its own) the weights go to that
        file as they leave the exporter, the ModelProto returned refers to it, and parity runs on a
        session ONNX Runtime opens from that folder (weights memory-mapped, never held twice)."""
        started = time.perf_counter()
        self._check_shared_weights()  # the user's model, whose weights the result may share, is unchanged
        model, notes = export_model_proto(bake_weight_masks(self._compiled_graph()), self.example_inputs, simplify=simplify,
                                          external_data=data_file, **self._export_options(dynamic_batch))
        if sparse:  # lossless: ORT rebuilds the dense weights when the session is created
            if data_file is not None:  # the sparse encoding reads the weights from the ModelProto
                load_inline(model, data_file.parent)
            model = compress_initializers(model)[0]
        dropped = self._drop_unused_inputs(model, keep_unused_inputs)
        if data_file is not None:  # what the lowering made new (int8, packed int4) joins the weights on disk
            externalize(model, data_file)
            save_model(model, data_file.with_suffix(""))
        collect()  # the exporter's intermediate programs go before the parity sessions open
        self._add_time("export", started)
        stamp: dict[str, Any] = {
            "fxcompress_recipe": self.recipe.name,
            "fxcompress_passes": ",".join(r.name for r in self.report.records if r.modified),
            "fxcompress_drift_vs_original": f"{self.report.drift:.3e}",
            "simplified": notes.get("simplified", False),
            **self._export_metadata(),
            **({DROPPED_INPUTS_KEY: ",".join(dropped)} if dropped else {}),
        }
        if self.report.masked:  # the drift above is over the positions the output mask keeps
            stamp["fxcompress_unmasked_drift_vs_original"] = f"{self.report.unmasked_drift:.3e}"
        if validate:
            check_gate(tolerance)
            allowed = self._export_gate().merged(tolerance)
            mask = self.output_mask if output_mask is None else output_mask
            check_output_mask(mask)
            started = time.perf_counter()
            # one session for every input set, closed after
            session = (create_session(model, optimize=False) if data_file is None else
                       create_session(data_file.with_suffix(""), optimize=False, read_in_place=True))
            calibration = self._parity_calibration()
            sets = self._parity_inputs(dynamic_batch)  # one file for every shape: check each that differs
            labels = self.report.extra.get("parity_shapes") or [""] * len(sets)
            for inputs, label in zip(sets, labels):
                real = calibration if inputs is self.example_inputs else []
                parity = validate_onnx(session, self._compiled_graph(), inputs, tolerance=allowed, output_mask=mask,
                                       real_inputs=real, random_inputs=max(1, PARITY_SETS - 1 - len(real)))
                self.report.parity = parity
                if not parity.passed:
                    raise ExportError(
                        "The exported ONNX model does not match the compiled module in ONNX Runtime"
                        f"{f' at {label}' if label not in ('', 'example') else ''}: {parity.to_text()}.",
                        "nothing was written; " + self._parity_advice(parity, simplify),
                    )
            del session
            self._add_time("parity", started)
            stamp.update({"fxcompress_parity_drift": f"{parity.drift:.3e}", "fxcompress_parity_cosine": f"{parity.cosine:.8f}"})
        from fxcompress.version import __version__

        set_metadata(model, {"fxcompress_version": __version__, **stamp, **(metadata or {})})
        return model

    @holding_tracing_lock
    def export_onnx(self, path: str | os.PathLike, **options: Any) -> Path:
        """Export ``module`` to a checked ONNX file at ``path`` and return the path.

        ``options`` are :meth:`export_proto`'s (``simplify``, ``dynamic_batch``, ``validate``,
        ``tolerance``, ``metadata``, ``sparse``, ``output_mask``, ``keep_unused_inputs``). The model is built and checked there before
        anything is written: a mismatch in ONNX Runtime raises ExportError and writes nothing.
        The write is atomic. The weights go from the compiled module to disk as they leave the
        exporter and ONNX Runtime reads them from there (docs/cost.md): a model under the 2 GB
        protobuf limit is one file; a larger one is ``path`` plus ``path.name + '.data'`` beside it
        (ONNX external data, which ``onnx.load`` and ONNX Runtime read).
        """
        path = check_output_path(path)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".export", dir=path.parent))
        try:
            data_file = work / (path.name + ".data")
            model = self._export(data_file, **options)
            return save_external_model(model, work, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    #: whether export keeps inputs no node reads by default (a decoder's fixed feed layout keeps them)
    _keeps_unused_inputs = False

    def _drop_unused_inputs(self, model: "onnx.ModelProto", keep: bool | None) -> list[str]:
        """Drop the graph inputs no node reads (unless kept) after recording every input name in
        ``model`` (so positional feeds still match by name); returns the dropped names."""
        initializers = {t.name for t in model.graph.initializer}
        set_metadata(model, {INPUT_NAMES_PROP: ",".join(v.name for v in model.graph.input if v.name not in initializers)})
        keep = self._keeps_unused_inputs if keep is None else keep
        dropped = [] if keep else drop_unused_inputs(model)
        self.report.extra["dropped_inputs"] = dropped
        return dropped

    def _add_time(self, stage: str, started: float) -> None:
        self.report.stages[stage] = self.report.stages.get(stage, 0.0) + time.perf_counter() - started

    def _export_options(self, dynamic_batch: bool | None) -> dict[str, Any]:
        """export_model_proto's shape and naming arguments for this result."""
        # Outputs take the model's field names, else output_0..n: never graph node names, which
        # change with the recipe (relu_18 under default, _to_copy_10 under fp16).
        names = ((self.call.names, self.call.output_names) if self.call is not None and self.call.structured
                 else (None, [f"output_{i}" for i in range(_output_count(self._compiled_graph()))]))
        axes = self.dynamic_axes
        if axes:  # the symbolic axes compile captured, under the names the user gave them
            _, flat, dim_names = _dynamic_axes_shapes(self.call, axes)
            return {"shapes": flat, "input_names": self.call.names, "output_names": names[1], "dim_names": dim_names}
        return {"dynamic_batch": self.dynamic_batch if dynamic_batch is None else dynamic_batch,
                "dynamic_sequence": self.dynamic_sequence, "input_names": names[0], "output_names": names[1]}

    def _parity_inputs(self, dynamic_batch: bool | None = None) -> list[tuple[torch.Tensor, ...]]:
        """The input sets export parity is checked on: the example, then one more per symbolic
        dimension the file has (batch, each named axis of ``dynamic_axes``) at a second size the
        compiled module runs at, and a second sequence length when the file serves every length.
        What was checked is listed in ``report.extra["parity_shapes"]``."""
        sets, checked = [self.example_inputs], ["example"]
        groups: dict[str, list[tuple[int, int]]] = {}
        if self.dynamic_axes:  # one dimension per name: inputs sharing it change together
            for (name, axis), dim in _dynamic_axes_shapes(self.call, self.dynamic_axes)[2].items():
                groups.setdefault(dim, []).append((self.call.names.index(name), axis))
        elif self.dynamic_batch if dynamic_batch is None else dynamic_batch:
            groups["batch"] = [(i, 0) for i in range(len(self.example_inputs))]
        for dim, places in groups.items():
            other = other_size(self._compiled_graph(), self.example_inputs, places)
            if other is not None:
                sets.append(other[1])
                checked.append(f"{dim}={other[0]}")
        if self.dynamic_sequence:
            sets.append(longer_sequences(self.example_inputs))
            checked.append("sequence+3")
        self.report.extra["parity_shapes"] = checked
        return sets

    def _parity_calibration(self) -> list[Any]:
        """The first calibration batches (at most PARITY_CALIBRATION_BATCHES) the exported file can run:
        shapes as the example's, apart from the axes the file leaves symbolic."""
        free = ({0} if self.dynamic_batch else set()) | ({1} if self.dynamic_sequence else set())
        return self.calibration.fitting(free, PARITY_CALIBRATION_BATCHES)

    def _parity_advice(self, parity: ParityReport, simplify: bool) -> str:
        """The fixes that can help with a failed export parity (never one that cannot)."""
        advice = []
        if simplify:
            advice.append("export with simplify=False (onnxsim rewrote the graph)")
        if self._export_gate().drift > LOSSLESS_TOLERANCE:  # a lossy pass exports inexactly (int8 kernels, fp16)
            advice.append("if the figures above are acceptable for your task, export with a looser bound (e.g. "
                          "tolerance={'rel_rms': ..., 'cosine': ...}, as compile takes)")
        advice.append("report the model with the figures above: the ONNX graph computes something the compiled module "
                      "does not")
        return "; or ".join(advice) + "."

    def _export_metadata(self) -> dict[str, Any]:
        """Metadata props particular to this kind of result (none here)."""
        return {}

    def _export_gate(self) -> Gate:
        """Lossless unless a kept pass exports inexactly (quantization, fp16): then compile's bounds.

        Pruning and sparsity are lossy against the original model (their recipes allow any
        drift) but exact against the compiled module, which is what export parity compares.
        A bf16 / fp16 model's bound is at least its dtype's rounding (numerics.half_parity_floor).
        """
        floor = half_parity_floor(getattr(torch, self.report.extra.get("model_dtype", "float32")))
        if all(r.exports_exactly for r in self.report.records if r.modified):
            return Gate(floor)
        return self.gate.with_drift_floor(floor)

    def _export_tolerance(self) -> float:
        """The drift bound of :meth:`_export_gate`."""
        return self._export_gate().drift


#: Input sets export parity runs per shape: the example, up to PARITY_CALIBRATION_BATCHES calibration
#: batches, and random sets making up the rest (at least one).
PARITY_SETS = 4
PARITY_CALIBRATION_BATCHES = 2


def _dynamic_axes_shapes(call: ModelCall, axes: Any) -> tuple[Any, list[dict[int, Any]], dict[tuple[str, int], str]]:
    """``{input name: {axis: dim name}}`` as torch.export dynamic shapes: for capture (the model's
    own call), per flat input (export), and the ONNX dimension names."""
    if not isinstance(axes, dict) or not all(isinstance(v, dict) for v in axes.values()):
        raise InputError("dynamic_axes must map input names to {axis: name}, e.g. {'pixel_values': {2: 'height', 3: 'width'}}.",
                         "pass a dict of dicts.")
    unknown = [n for n in axes if n not in call.names]
    if unknown:
        raise InputError(f"dynamic_axes names {unknown}, which are not inputs of the model (its inputs: {', '.join(call.names)}).",
                         "use the input names (the keyword names, or forward()'s parameter names).")
    flat: list[dict[int, Any]] = []
    names: dict[tuple[str, int], str] = {}
    for name, tensor in zip(call.names, call.flat):
        spec = {}
        for axis, dim_name in axes.get(name, {}).items():
            if not isinstance(axis, int) or not 0 <= axis < tensor.dim() or not str(dim_name).isidentifier():
                raise InputError(f"dynamic_axes[{name!r}] has axis {axis!r} -> {dim_name!r}, but {name} has {tensor.dim()} "
                                 "axes and a dimension name must be an identifier.", "give axes like {2: 'height', 3: 'width'}.")
            # Dim.DYNAMIC: the range comes from the model (position tables bound a sequence), and an
            # axis the model fixes is an error, not silently static; the ONNX file gets ``dim_name``.
            spec[axis] = torch.export.Dim.DYNAMIC
            names[(name, axis)] = str(dim_name)
        flat.append(spec)
    if not call.structured:
        return tuple(flat), flat, names
    if call.args or list(call.kwargs) != call.names:
        raise InputError("dynamic_axes needs the inputs as one tensor per keyword (a dict) or as positional tensors.",
                         "pass example inputs like {'pixel_values': x}, or use dynamic_batch / dynamic_sequence.")
    return dict(zip(call.names, flat)), flat, names


def _output_count(graph_module: fx.GraphModule) -> int:
    output = next(n for n in reversed(graph_module.graph.nodes) if n.op == "output")
    return len(torch.utils._pytree.tree_leaves(output.args[0]))


#: Why a lossy pass can find nothing to change, by pass: the note a compile that changed nothing gives.
UNCHANGED_REASONS = {
    "quantize-int8-dynamic": "no linear layers for int8-dynamic; try int8",
    "quantize-int8": "no convolution or linear layer int8 can quantize",
    "quantize-weights": "no linear or embedding layer large enough for weight-only quantization; try int8-dynamic or int8",
    "convert-fp16": "nothing fp16 could convert",
    "sparsify-2:4": "no layer whose weights fit 2:4 sparsity",
    "sparsify-magnitude": "no layer to sparsify",
    "prune-channels": "no channel group that can be pruned",
}


def unchanged_note(recipe: Recipe, records: Sequence[PassRecord]) -> str | None:
    """A note when every lossy pass of ``recipe`` ran and changed nothing (the file equals what
    a lossless recipe makes, under a lossy preset's name), with the reason; None otherwise."""
    from fxcompress.infra.registry import available_passes

    registered = available_passes()
    lossy = [r for r in records if (cls := registered.get(r.name.rsplit("/", 1)[-1])) is not None and not cls.lossless]
    if not lossy or any(r.modified for r in lossy):
        return None
    short = lossy[-1].name.rsplit("/", 1)[-1]
    reason = UNCHANGED_REASONS.get(short, f"pass {short} found nothing to change")
    return f"recipe '{recipe.name}' changed nothing lossy on this model: {reason}."


def _final_comparisons(module: fx.GraphModule, inputs: Sequence[torch.Tensor], reference: Any,
                       masks: Sequence[Any], names: Sequence[str]) -> list:
    with torch.no_grad():
        # Clones: a graph that writes into its input must not change the caller's tensors.
        outputs = flatten_outputs(module(*(t.clone() for t in inputs)))
    return compare_outputs(flatten_outputs(reference), outputs, masks, names)


def _refuse_cached_decoder(model: Any) -> None:
    """A transformers causal LM that returns its KV cache cannot be captured as one graph (its
    DynamicCache output is no tensor): say to use compile_decoder, not what torch.export says."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not name.endswith(("ForCausalLM", "LMHeadModel")) or not getattr(config, "use_cache", False):
        return
    raise CaptureError(
        f"{name} is a causal LM that returns its KV cache, which fxcompress.compile does not capture.",
        "use fxcompress.compile_decoder(model, recipe) (the cache as graph inputs and outputs, generation with "
        "fxcompress.generate), or set model.config.use_cache = False to compile the logits-only graph.",
    )


def _user_metric(evaluate: Any, max_metric_drop: float | None) -> UserMetric | None:
    """The checked user metric of an accuracy-aware compile, or None without ``evaluate``."""
    if evaluate is None:
        if max_metric_drop is not None:
            raise InputError("max_metric_drop was given without evaluate, so there is no metric to keep within it.",
                             "pass evaluate=lambda module: my_accuracy(module) (higher is better) as well.")
        return None
    return UserMetric(evaluate, max_metric_drop)


#: compile() keywords that now live in :class:`CompileOptions`: a call still passing one is told where it went.
MOVED_TO_OPTIONS = ("dynamic_batch", "dynamic_sequence", "dynamic_axes", "instruments", "dump_dir", "executor")


def refuse_moved_keywords(moved_names: Sequence[str], options_class: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: a keyword of ``moved_names`` (now a field of ``fxcompress.<options_class>``) raises
    InputError naming the fix, instead of Python's bare TypeError."""

    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            moved = [name for name in kwargs if name in moved_names]
            if moved:
                given = ", ".join(f"{name}={kwargs[name]!r}" for name in moved)
                raise InputError(
                    f"{function.__name__}() takes {', '.join(moved)} in its options object now, not as a keyword.",
                    f"pass options=fxcompress.{options_class}({given}).",
                )
            return function(*args, **kwargs)

        return checked

    return decorator


@refuse_moved_keywords(MOVED_TO_OPTIONS, "CompileOptions")
def compile(  # noqa: A001 - the product's verb; fxcompress.compile mirrors torch.compile
    model: nn.Module,
    example_inputs: Any,
    recipe: str | os.PathLike | Recipe | Sequence[str | Pass] = "default",
    calibration: Any = None,
    *,
    tolerance: float | Mapping[str, float] | None = None,
    output_mask: OutputMask = None,
    evaluate: Callable[[Any], float] | None = None,
    max_metric_drop: float | None = None,
    progress: bool = False,
    options: CompileOptions | None = None,
) -> CompileResult:
    """Capture ``model`` and run a recipe of passes over it.

    The keywords are what a user changes from one compile to the next: the recipe and its data,
    the acceptance bounds the result is judged by (``tolerance``, ``output_mask``; export parity
    takes the same two), the user's own metric, progress bars. Settings most compiles leave at
    their defaults (symbolic axes, instruments and IR dumps, the executor of the accuracy search)
    are one :class:`CompileOptions` object, ``options``.

    Args:
        model: the PyTorch model; never modified (work happens on a deep copy in eval mode).
        example_inputs: what the model takes: a tensor, a tuple of positional tensors, a dict of
            keyword tensors (a tokenizer's ``BatchEncoding``), an ``(args, kwargs)`` pair, or
            nested lists/tuples of tensors. With keyword or nested inputs, ONNX inputs take the
            keyword names, outputs the model's field names, and ``result.module`` is called like
            the model (a :class:`~fxcompress.capture.StructuredModule`).
        recipe: a preset name ("default", see ``fxcompress passes``), a path to a TOML recipe,
            a Recipe, or a list of pass names / Pass objects.
        calibration: inputs for data-driven passes (quantization), each in the example's form: a list, a DataLoader,
            any re-iterable, a callable returning an iterator, or a :class:`~fxcompress.calibration.Calibration`.
            Streamed, not copied.
        tolerance: the acceptance bounds (default: the recipe's, docs/fidelity.md): a number
            is a drift bound alone (max abs error / max output, the criterion it always was;
            ``float("inf")`` accepts anything); a dict with keys ``drift``,
            ``rel_rms`` (relative RMS error) and ``cosine`` replaces the bounds it names. Each
            output is checked (masked where a mask applies); a result beyond a bound raises
            DriftError naming the measure. ``export_onnx`` honours them too.
        output_mask: which output positions drift counts (fxcompress.fidelity). Default: where
            the model takes an input named ``attention_mask``, the positions it excludes
            (padding) are ignored in every output whose leading dims are ``[batch, sequence]``;
            other outputs are compared whole. ``False`` counts every position; a string names
            another mask input; a callable ``output_mask(inputs, outputs)`` (dicts of tensors by
            name) returns one boolean mask, a list/dict of masks (None = whole), or None. Where
            a mask applies, the masked drift is the one checked against ``tolerance`` (and by
            ``export_onnx``); the drift over all positions is reported beside it
            (``report.unmasked_drift``, ``report.outputs``).
        evaluate: the user's own metric, ``evaluate(module) -> float``, higher is better (e.g.
            accuracy on a held-out set, calling the module as the model is called). Scored on the
            original model and on the result (``result.report.metric``).
        max_metric_drop: with ``evaluate``, accuracy-aware compile: lossy passes that can keep
            layers in float (quantize-int8, quantize-int8-dynamic) rank layers by sensitivity and
            bisect on how many of the most sensitive stay in float until the metric drops at most
            this much; each trial is listed in the pass's ``stats["metric_trials"]``.
        progress: show progress bars in long passes (calibration) and each metric trial.
        options: a :class:`CompileOptions` (symbolic batch, sequence or other axes; instruments;
            ``dump_dir``; the executor of the accuracy-aware search); default ``CompileOptions()``.

    Raises:
        InputError, CaptureError, RecipeError, PassError, DriftError: each with a one-paragraph
        explanation and the fix.
    """
    return run_compile(model, example_inputs, recipe, calibration, tolerance=tolerance, output_mask=output_mask,
                       evaluate=evaluate, max_metric_drop=max_metric_drop, progress=progress, options=options)


@holding_tracing_lock
def run_compile(
    model: nn.Module,
    example_inputs: Any,
    recipe: str | os.PathLike | Recipe | Sequence[str | Pass] = "default",
    calibration: Any = None,
    *,
    tolerance: float | Mapping[str, float] | None = None,
    output_mask: OutputMask = None,
    evaluate: Callable[[Any], float] | None = None,
    max_metric_drop: float | None = None,
    progress: bool = False,
    options: CompileOptions | None = None,
    dynamic_shapes: Any = None,
    make_result: Callable[..., CompileResult] = CompileResult,
) -> CompileResult:
    """:func:`compile`, plus what only the library's own front ends set (not part of the public API).

    Args:
        dynamic_shapes: an explicit torch.export dynamic-shapes spec for positional inputs, used
            instead of the options' symbolic axes at capture (what
            :func:`fxcompress.decoder.compile_decoder` passes for the KV cache).
        make_result: builds the result from :class:`CompileResult`'s arguments (compile_decoder
            builds a :class:`~fxcompress.decoder.DecoderCompileResult`).
    """
    options = _check_options(options)
    dynamic_batch, dynamic_sequence = options.dynamic_batch, options.dynamic_sequence
    dynamic_axes, instruments, dump_dir, executor = options.dynamic_axes, options.instruments, options.dump_dir, options.executor
    start = time.perf_counter()
    _refuse_cached_decoder(model)
    check_gate(tolerance)
    check_output_mask(output_mask)
    call = model_call(model if isinstance(model, nn.Module) else None, example_inputs)
    inputs = call.flat
    resolved = resolve_recipe(recipe)  # unknown passes/options fail before any work
    check_memory(model, resolved.name)  # a model too big for this machine fails now, not in the allocator
    gate = resolved.gate.merged(tolerance)
    allowed = gate.drift
    metric = _user_metric(evaluate, max_metric_drop)
    # The reference and the captured graph share the user's parameters (not copied: the weights
    # are held once); passes run under the manager's copy-on-write guard, and the result gets
    # tensors of its own below, so the user's model is never written to.
    reference_model = private_copy(model, share_parameters=True)
    reference = run_eager(FlatCall(reference_model, call) if call.structured else reference_model, inputs)
    check_finite_outputs(model, reference)
    names = call.output_names if call.structured else None
    masks = output_masks(output_mask, call.names, inputs, output_tensors(reference), names)
    if metric is not None:
        metric.baseline = metric.score(reference_model, "the original model")
        if call.structured:
            metric.as_user_module = lambda module: StructuredModule(module, call)
    if dynamic_axes:
        dynamic_shapes = _dynamic_axes_shapes(call, dynamic_axes)[0]
    graph_module = capture(reference_model, example_inputs, dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence,
                           shapes=dynamic_shapes)
    nodes_before, params_before = count_compute_nodes(graph_module), count_parameters(graph_module)
    captured = time.perf_counter()
    recorder = RecordDiff()
    verify = VerifyNumerics(inputs, reference, masks=masks)
    all_instruments: list[Instrument] = [Timing(), recorder, verify, *instruments]
    if dump_dir is not None:
        all_instruments.append(DumpIR(dump_dir))
    manager = resolved.build(all_instruments)
    calibration_batches = Calibration(calibration, call)  # built once: every pass and export parity read it
    manager.bind(CompileContext(inputs, calibration_batches, reference, progress, metric))
    with trials_through(executor.map_calls if executor is not None else None), masked_by(output_mask, call.names, names):
        result = manager(graph_module)
    compiled = result.graph_module
    piped = time.perf_counter()
    del graph_module, result
    collect()  # what discarded graphs left for the cyclic collector goes before the result is made its own
    # The result shares the weights no pass changed with the user's model until its first use
    # (CompileResult.module copies them then): an export-only compile never holds them twice.
    shared = SharedWeights(compiled, model.parameters())
    comparisons = _final_comparisons(compiled, inputs, reference, masks, call.output_names if call.structured else None)
    in_passes = sum(r.seconds or 0.0 for r in manager.records)
    stages = {"capture": captured - start, "passes": in_passes, "verification": verify.seconds,
              "pipeline": max(0.0, piped - captured - in_passes - verify.seconds), "final check": time.perf_counter() - piped}
    report = CompileReport(
        recipe=resolved.name,
        records=manager.records,
        tolerance=allowed,
        seconds=time.perf_counter() - start,
        nodes_before=nodes_before,
        nodes_after=count_compute_nodes(compiled),
        params_before=params_before,
        params_after=count_parameters(compiled),
        converged=manager.converged,
        outputs=output_fidelity([comparisons]),
        note=unchanged_note(resolved, manager.records),
        stages=stages,
        gate=gate,
    )
    # a bf16 / fp16 model is compiled in its own dtype; export parity allows that dtype's rounding
    if isinstance(model, nn.Module):
        report.extra["model_dtype"] = str(model_float_dtype(model)).removeprefix("torch.")
    if metric is not None:
        compiled_metric = metric.score(metric.as_user_module(compiled), "the compiled module")
        report.metric = {"baseline": metric.baseline, "compiled": compiled_metric,
                         "drop": metric.baseline - compiled_metric, "max_drop": metric.max_drop}
        if metric.max_drop is not None and not report.metric["drop"] <= metric.max_drop:
            raise DriftError(
                f"The compiled model scores {compiled_metric:.6g} on evaluate (original {metric.baseline:.6g}): a drop of "
                f"{report.metric['drop']:.4g}, beyond max_metric_drop={metric.max_drop:g}, and no pass of recipe "
                f"'{resolved.name}' could keep layers in float to close the gap.",
                "raise max_metric_drop, or use a recipe whose lossy pass supports accuracy-aware compile "
                "(int8, int8-dynamic), or fine-tune result.module (prune, sparse).",
            )
    failures = gate.failures(report.outputs)
    if failures:
        worst = max((r for r in report.records if r.drift is not None), key=lambda r: r.drift, default=None)
        culprit = f" The largest drift was measured after pass '{worst.name}' ({worst.drift:.2e})." if worst else ""
        masked = (f" (over the positions the output mask keeps; drift over all positions {report.unmasked_drift:.2e})"
                  if report.masked else "")
        source = "the tolerance given" if tolerance is not None else f"recipe '{resolved.name}'"
        raise DriftError(
            f"The compiled model's outputs are beyond the bounds of {source} ({gate.describe()}): "
            f"{'; '.join(failures)}{masked}.{culprit}",
            "if that accuracy is acceptable for your task, raise the tolerance of the measure that failed (tolerance=<drift> or "
            "tolerance={'rel_rms': ..., 'cosine': ...}, or `tolerance` / `rel_rms` / `min_cosine` in the recipe); "
            "else use a less aggressive recipe (e.g. int8-dynamic instead of int8) or keep sensitive layers in float "
            "(evaluate= with max_metric_drop=).",
        )
    return make_result(compiled, report, resolved, inputs, recorder, options, call, tolerance, output_mask,
                       calibration_batches, shared_weights=shared)


def _check_options(options: Any) -> CompileOptions:
    """``options`` (default ``CompileOptions()``), or an InputError naming the form it must have."""
    if options is None:
        return CompileOptions()
    if not isinstance(options, CompileOptions):
        raise InputError(f"options must be a fxcompress.CompileOptions, got a {type(options).__name__}.",
                         "pass options=fxcompress.CompileOptions(dynamic_batch=True, ...) or leave it out.")
    return options


def diff(a: Any, b: Any) -> Any:
    """What changed from ``a`` to ``b``: two ONNX models, two GraphModules, or two graph snapshots.

    ONNX paths or ModelProtos give an :class:`~fxcompress.inspect.onnx_diff.OnnxDiff` (op counts,
    added/removed/rewired nodes, parameters, MACs, sizes); GraphModules or snapshots (e.g.
    ``result.snapshots.snapshot("fold-batchnorm")``) give a
    :class:`~fxcompress.analysis.graph_diff.GraphDiff` grouped by layer. Both render with
    ``fxcompress.inspect.render_text``. Missing or unreadable files raise ModelFileError.
    """
    from fxcompress.inspect.dispatch import diff_any

    return diff_any(a, b)


__all__ = ["CompileOptions", "CompileReport", "CompileResult", "compile", "diff"]
