"""ORT session factory that asks for providers explicitly and reports what it actually got.

ORT silently falls back to the CPU provider when the CUDA libraries cannot be loaded; a timing
labelled "cuda" that ran on CPU is a lie (docs/design.md, decision 6). Every session therefore records
the providers requested and those ``session.get_providers()`` reports, and a fallback is warned
about loudly and shown in every report.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fxcompress.errors import InputError, RuntimeProviderError
from fxcompress.graph_meta import INPUT_NAMES_PROP

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_SHORT = {v: k for k, v in PROVIDERS.items()}


class ProviderFallbackWarning(UserWarning):
    """The requested execution provider is not the one the session runs on."""


@dataclass
class RuntimeSession:
    """An ORT InferenceSession with the truth about its providers."""

    session: ort.InferenceSession
    requested: list[str]
    providers: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        """Short name ("cuda"/"cpu") of the provider that runs first in the session."""
        return _SHORT.get(self.providers[0], self.providers[0]) if self.providers else "none"

    @property
    def fell_back(self) -> bool:
        """True if the first requested provider is not active."""
        return bool(self.requested) and self.requested[0] not in self.providers

    def feeds(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Inputs as a feed dict, checked against the model's declared inputs."""
        return make_feeds(self.session, inputs)

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        return self.session.run(None, self.feeds(inputs))


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; a bf16 model's file takes float32 (export.half)
            value = value.float()
        return value.detach().cpu().numpy()
    return np.asarray(value)


def recorded_input_names(session: ort.InferenceSession) -> list[str] | None:
    """Every input name of the compiled graph in order, unused ones included, as the export recorded
    it (:data:`fxcompress.graph_meta.INPUT_NAMES_PROP`); None for a file without that record."""
    meta = getattr(session, "get_modelmeta", None)  # a stand-in session may not have one
    value = meta().custom_metadata_map.get(INPUT_NAMES_PROP) if meta is not None else None
    return value.split(",") if value else None


def make_feeds(session: ort.InferenceSession, inputs: Sequence[Any], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Map inputs to the session's inputs; InputError on count/shape/dtype mismatch.

    ``inputs`` are matched by name: ``names`` gives the name of each (default: the input names the
    export recorded, unused ones included), so a file whose unused inputs were dropped takes the
    same positional inputs as the model; a value whose name the file does not take is left out.
    Without names (a file from elsewhere) they are matched by position.
    """
    declared = session.get_inputs()
    names = list(names) if names is not None else recorded_input_names(session)
    if names is not None and len(names) == len(inputs):
        by_name = dict(zip(names, inputs))
        missing = [d.name for d in declared if d.name not in by_name]
        if missing:
            raise InputError(f"The ONNX model takes the input(s) {', '.join(missing)}, which none of the {len(inputs)} "
                             f"given ({', '.join(names)}) is.", "pass one tensor per model input, as the model takes them.")
        pairs = [(names.index(d.name), d, by_name[d.name]) for d in declared]
    elif len(inputs) != len(declared):
        raise InputError(
            f"The ONNX model takes {len(declared)} input(s) ({', '.join(d.name for d in declared)}) but {len(inputs)} were given.",
            "pass one tensor per model input, in order.",
        )
    else:
        pairs = [(i, d, value) for i, (d, value) in enumerate(zip(declared, inputs))]
    feeds = {}
    for i, spec, value in pairs:
        array = to_numpy(value)
        want = _ORT_TO_NUMPY.get(spec.type)
        if want is not None and array.dtype != want:
            raise InputError(
                f"Input {i} ('{spec.name}') has dtype {array.dtype} but the model expects {np.dtype(want)}.",
                f"convert it first, e.g. tensor.to(torch.{np.dtype(want).name}).",
            )
        if len(spec.shape) != array.ndim or any(
            isinstance(d, int) and d != s for d, s in zip(spec.shape, array.shape)
        ):
            raise InputError(
                f"Input {i} ('{spec.name}') has shape {list(array.shape)} but the model expects {list(spec.shape)}.",
                "pass inputs of the exported shape (named dimensions may vary; fixed ones may not).",
            )
        feeds[spec.name] = array
    return feeds


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the nvidia-* wheels before asking for the CUDA provider.

    onnxruntime-gpu finds them on the library path only; where they came as pip wheels (beside
    torch) ``preload_dlls`` loads them from site-packages. Best effort: a failure here shows up
    as a provider fallback, which create_session reports.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        # It prints its own warnings; a real failure surfaces as the fallback we report.
        with contextlib.redirect_stdout(io.StringIO()):
            preload()
    except Exception:  # noqa: BLE001
        pass


def create_session(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    provider: str = "cpu",
    *,
    optimize: bool = True,
    optimized_model_path: str | os.PathLike | None = None,
    threads: int | None = None,
    profile_prefix: str | os.PathLike | None = None,
    spin: bool = True,
    read_in_place: bool = False,
) -> RuntimeSession:
    """Create an ORT session asking for ``provider`` ("cpu" or "cuda") explicitly.

    Args:
        model: a path, serialized bytes or a ModelProto.
        provider: "cuda" requests CUDA then CPU; "cpu" requests CPU only.
        optimize: ORT graph optimizations (off for parity checks, on for timing).
        optimized_model_path: where ORT writes the graph it actually runs (to check fusions).
        threads: intra-op threads (None: ORT's default).
        profile_prefix: if set, ORT's profiler is on and writes its JSON to files starting with
            this path (``session.end_profiling()`` returns the name); see runtime.placement.
        spin: let the intra-op threads busy-wait for more work after a run (ORT's default). False
            for a session that runs rarely beside another, whose threads it would slow down.
        read_in_place: ``model`` is a path fxcompress has just written and checked itself: ORT
            opens it directly and memory-maps its external data, instead of the file being read
            (and checked) into a ModelProto and serialized again, which holds the weights twice.
    """
    if provider not in PROVIDERS:
        raise RuntimeProviderError(f"Unknown provider {provider!r}.", f"use one of {', '.join(PROVIDERS)}.")
    requested = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # ORT logs CUDA library load failures as errors before falling back; we report it ourselves.
    options.log_severity_level = 4 if provider != "cpu" else 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if provider == "cuda":
        _preload_cuda_libraries()
    if isinstance(model, (str, os.PathLike)) and read_in_place:
        model = str(model)
    elif isinstance(model, (str, os.PathLike)):
        # Files go through load_onnx, the one reader: size limit, truncation, external-data paths.
        from fxcompress.export.onnx_export import load_onnx

        model = load_onnx(model)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, Path):
        source = str(source)
    # The failure to load CUDA libraries is logged through ORT's process-wide logger, not the
    # session's; silence it while creating the session, since we warn about fallback ourselves.
    if provider != "cpu":
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=requested)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeProviderError(
            f"ONNX Runtime could not load the model on {requested}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}.",
            "check the file with `fxcompress inspect`; for CUDA, check that the CUDA libraries onnxruntime-gpu needs are installed.",
        ) from None
    finally:
        ort.set_default_logger_severity(2)
    result = RuntimeSession(session, requested, list(session.get_providers()))
    if result.fell_back:
        warnings.warn(
            f"Requested {requested[0]} but ONNX Runtime runs this session on {result.providers}: "
            "the CUDA provider is unavailable here (missing GPU or CUDA libraries). Results are CPU results.",
            ProviderFallbackWarning,
            stacklevel=2,
        )
    return result
