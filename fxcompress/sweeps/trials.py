"""Sweep trials: which (model spec, recipe) pairs to run, and what one trial measures.

A spec is any model SPEC the CLI takes (``torchvision:NAME``, ``package.module:function``,
``file.pt2``, ``file.pt`` with trust); a spec file lists one per line (``#`` starts a comment).
A trial compiles one spec with one recipe, exports it to ONNX (parity-checked against the
compiled module) and checks the ONNX model against the original PyTorch model in ONNX Runtime;
a *benchmark* trial also times it against the plain ``torch.onnx.export`` of the original
(:func:`fxcompress.comparison.compare`) and so runs alone on its machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from fxcompress.errors import FxCompressError, InputError
from fxcompress.sweeps.executor import Task

#: What :func:`run_trial` records when the trial itself went through (compiled and checked).
OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class TrialOptions:
    """How every trial of a sweep runs (picklable: it travels to worker processes)."""

    benchmark: bool = False
    provider: str = "cpu"
    runs: int = 48
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    trust_pickle: bool = False
    tolerance: float | None = None
    calibration: str | None = None  # as the CLI's --calibration: random:N, a .pt file, package.module:function


def read_spec_file(path: str | os.PathLike) -> list[str]:
    """The specs listed in ``path``: one per line, blank lines and ``#`` comments skipped."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"The spec file {file} does not exist.", "give a text file with one model spec per line.")
    specs = [line.split("#", 1)[0].strip() for line in file.read_text().splitlines()]
    return [s for s in specs if s]


def check_spec(spec: str) -> str:
    """``spec`` if it has one of the SPEC forms, else an InputError naming the forms.

    Only the form is checked here (cheaply, before any trial runs); a well-formed spec whose
    model cannot be built (a missing torchvision name, a factory that raises) becomes that
    trial's ``failed`` record.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"The model spec {spec!r} is empty or not a string.", "give specs like torchvision:resnet18.")
    suffix = Path(spec).suffix.lower()
    if suffix in (".pt2", ".pt", ".pth", ".pkl", ".bin") or ":" in spec:
        return spec.strip()
    raise InputError(f"Cannot tell what model the sweep spec {spec!r} names.",
                     "use torchvision:NAME, package.module:function, a .pt2 archive, or a .pt file (with trust_pickle).")


def trial_key(spec: str, recipe: str) -> str:
    """The results log's key of one trial."""
    return f"{spec} | {recipe}"


def make_tasks(specs: Iterable[str], recipes: Sequence[str], options: TrialOptions, gpus: int = 0) -> list[Task]:
    """One task per (spec, recipe), specs outer: compile trials use one core; benchmark trials
    are exclusive (all cores, plus ``gpus`` for the CUDA provider)."""
    tasks = []
    for spec in dict.fromkeys(check_spec(s) for s in specs):
        for recipe in dict.fromkeys(recipes):
            tasks.append(Task(trial_key(spec, str(recipe)), "fxcompress.sweeps.trials:run_trial", (spec, str(recipe), options),
                              cpus=(os.cpu_count() or 1) if options.benchmark else 1,
                              gpus=gpus if options.benchmark else 0, exclusive=options.benchmark))
    return tasks


def run_trial(spec: str, recipe: str, options: TrialOptions) -> dict[str, Any]:
    """Compile ``spec`` with ``recipe`` and check it: one record (status ``ok`` or ``failed``).

    A problem the user can fix (the model cannot be loaded or captured, a pass failed, drift
    beyond tolerance, export parity) is a ``failed`` record carrying the error's paragraph;
    anything else propagates to the executor, which records it as an ``error``.
    """
    import torch

    from fxcompress.analysis.macs import count_macs
    from fxcompress.api import compile as compile_model
    from fxcompress.loading import load_calibration, load_model
    from fxcompress.runtime.parity import validate

    record: dict[str, Any] = {"spec": spec, "recipe": recipe, "status": FAILED}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        loaded = load_model(spec, options.input_shapes, trust_pickle=options.trust_pickle)
        calibration = load_calibration(options.calibration, loaded)  # an image folder or text gets the model's preprocessing
        result = compile_model(loaded.model, loaded.example_inputs, recipe, calibration, tolerance=options.tolerance)
        record["compile_seconds"] = round(time.perf_counter() - start, 2)
        captured, compiled = result.snapshots.snapshots[0], result.graph_module
        records = result.report.records
        record.update(
            nodes_before=result.report.nodes_before, nodes_after=result.report.nodes_after,
            all_nodes_before=len(captured.nodes), all_nodes_after=len(compiled.graph.nodes),
            params_before=result.report.params_before, params_after=result.report.params_after,
            macs_before=captured.macs, macs_after=count_macs(compiled), drift=result.report.drift,
            changed=sorted({r.name for r in records if r.modified}),
            rolled_back=[f"{r.name}: {r.rolled_back}" for r in records if r.rolled_back],
            passes_adding_nodes=sorted({r.name for r in records
                                        if r.nodes_after is not None and r.nodes_after > (r.nodes_before or 0)}),
        )
        proto = result.export_proto()  # raises ExportError on an ORT mismatch with the compiled module
        record["onnx_bytes"] = proto.ByteSize()
        tolerance = result.gate.with_drift_floor(result._export_tolerance())  # noqa: SLF001 - the bounds export parity uses
        parity = validate(proto, loaded.model, result.model_inputs, tolerance=tolerance, random_inputs=1)
        record.update(parity_passed=parity.passed, parity_drift=parity.drift, parity_provider=parity.provider)
        if options.benchmark:
            from fxcompress.comparison import compare

            comparison = compare(result, loaded.model, proto, provider=options.provider, runs=options.runs)
            plain, ours = comparison.variants[0], comparison.compiled
            record.update(plain_onnx_bytes=plain.size_bytes, plain_p50_ms=plain.p50_ms, p50_ms=ours.p50_ms,
                          speedup=comparison.speedup, provider=comparison.provider, fell_back=comparison.fell_back)
        record["status"] = OK if parity.passed else FAILED
        if not parity.passed:
            record["error"] = f"ONNX Runtime disagrees with the original model: {parity.to_text()}"
    except FxCompressError as exc:
        record.update(error_type=type(exc).__name__, error=str(exc)[:2000])
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record
