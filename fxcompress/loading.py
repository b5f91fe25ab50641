"""Load models named on the command line: ``hf:ID_OR_FOLDER``, ``timm:NAME``, ``torchvision:NAME``
(fxcompress.model_specs), ``package.module:function``, ``.pt2`` torch.export archives, and (only
with explicit trust) pickled modules.

Unpickling runs arbitrary code, so a pickled ``.pt``/``.pth`` module is refused unless the caller
says it trusts the file; weights and archives are loaded with ``weights_only``-style safe loading.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fxcompress.inputs import model_call, normalize_inputs
from fxcompress.errors import InputError, ModelFileError, UntrustedFileError
from fxcompress.files import check_model_file
from fxcompress.model_specs import LoadedModel, load_model_spec

def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> (1, 3, 224, 224); InputError if malformed."""
    try:
        # Every part must be a number: "1,x,8" is a typo, not the shape (1, 8).
        shape = tuple(int(p) for p in re.split(r"[,x]", text.strip()))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"Input shape {text!r} is not a list of positive integers.", "write it like 1,3,224,224.")
    return shape


def _inputs_from_shapes(shapes: Sequence[tuple[int, ...]] | None, default: tuple[int, ...] | None, what: str) -> tuple[torch.Tensor, ...]:
    if shapes:
        return tuple(torch.randn(s) for s in shapes)
    if default is None:
        raise InputError(f"{what} does not say what inputs it takes.", "give --input-shape (e.g. 1,3,224,224), once per input.")
    return (torch.randn(default),)


def _factory(spec: str, shapes) -> LoadedModel:
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"Cannot import {module_name!r} for model spec {spec!r}: {exc}.",
                         "use package.module:function with the package importable (on PYTHONPATH).") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise InputError(f"{module_name} has no callable {func_name!r}.", "name a function that returns a model or (model, example_inputs).")
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, inputs = made
        if shapes:
            inputs = _inputs_from_shapes(shapes, None, spec)
        else:
            call = model_call(model, inputs, f"the example inputs {spec} returned")
            inputs = inputs if call.structured else call.flat
    elif isinstance(made, nn.Module):
        model, inputs = made, _inputs_from_shapes(shapes, None, spec)
    else:
        raise InputError(f"{spec} returned {type(made).__name__}, not a model.", "return an nn.Module or (module, example_inputs).")
    return LoadedModel(model.eval(), inputs, spec)


#: Archive members that torch.export.load unpickles with plain ``pickle`` (not ``torch.load``).
_RAW_PICKLE_PREFIXES = ("custom_obj_", "opaque_obj_")


@contextlib.contextmanager
def _weights_only_loads():
    """Force every ``torch.load`` inside to ``weights_only=True``.

    torch.export.load unpickles weights, constants and sample inputs with ``weights_only=False``
    (and falls back to it when a safe load fails), so a crafted .pt2 runs code on load. torch
    honours TORCH_FORCE_WEIGHTS_ONLY_LOAD at call time; the variable is process-wide while set.
    """
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _untrusted_archive(path: Path, detail: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"{path} holds pickled Python objects that are not plain tensors ({detail}); loading them runs code from the file.",
        "only if you trust the file, pass --trust-pickle (trust_pickle=True); otherwise re-export it without custom objects.",
    )


def _archive(path: Path, shapes, trust: bool = False) -> LoadedModel:
    check_model_file(path)
    if not trust:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelFileError(f"{path} is not a loadable torch.export archive ({type(exc).__name__}: {exc}).",
                                 "the file is corrupt or truncated: save it again with torch.export.save.") from None
        raw = [n for n in names if n.rsplit("/", 1)[-1].startswith(_RAW_PICKLE_PREFIXES)]
        if raw:
            raise _untrusted_archive(path, f"{raw[0]}")
    try:
        with _weights_only_loads() if not trust else contextlib.nullcontext():
            program = torch.export.load(str(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise _untrusted_archive(path, f"it references {found.group(1)}" if found else "a weights-only load refused it") from None
    except Exception as exc:  # noqa: BLE001 - corrupt zip, wrong format, version skew
        raise ModelFileError(f"{path} is not a loadable torch.export archive ({type(exc).__name__}: {str(exc)[:160]}).",
                             "save it with torch.export.save(torch.export.export(model, args), path).") from None
    model = program.module()
    example = getattr(program, "example_inputs", None)
    if shapes:
        inputs = _inputs_from_shapes(shapes, None, str(path))
    elif example is not None and example[0]:
        inputs = normalize_inputs(tuple(example[0]))
    else:
        raise InputError(f"{path} stores no example inputs.", "give --input-shape for each input.")
    return LoadedModel(model, inputs, f"torch.export archive {path.name}")


def _pickle(path: Path, shapes, trust: bool) -> LoadedModel:
    check_model_file(path)
    if not trust:
        raise UntrustedFileError(
            f"{path} is a pickled file; loading a pickled module runs whatever code it contains.",
            "only if you trust the file, pass --trust-pickle (trust_pickle=True); prefer a torch.export .pt2 archive.",
        )
    try:
        model = torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path} could not be unpickled ({type(exc).__name__}: {str(exc)[:160]}).",
                             "the file is corrupt or truncated, or needs classes that are not importable.") from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{path} holds a {type(model).__name__}, not an nn.Module (a state_dict?).",
                             "save the module itself, or write a factory function and use package.module:function.")
    return LoadedModel(model.eval(), _inputs_from_shapes(shapes, None, str(path)), f"pickled module {path.name}")


def load_model(spec: str, input_shapes: Sequence[tuple[int, ...]] | None = None, *, trust_pickle: bool = False,
               weights: str | None = None, num_classes: int | None = None, task: str | None = None,
               max_length: int | None = None) -> LoadedModel:
    """Resolve a model SPEC: ``hf:ID_OR_FOLDER``, ``timm:NAME``, ``torchvision:NAME`` (with
    ``weights``: "pretrained" or a weights file; ``num_classes``; ``task`` for hf:), or
    ``package.module:function``, ``file.pt2``, a pickled ``file.pt``/``.pth`` (only with ``trust_pickle``)."""
    loaded = load_model_spec(spec, input_shapes, weights=weights, num_classes=num_classes, task=task, max_length=max_length)
    if loaded is not None:
        return loaded
    if weights is not None or num_classes is not None or task is not None:
        raise InputError(f"--weights, --num-classes and --task apply to hf:, timm: and torchvision: specs, not {spec!r}.",
                         "load the weights inside your factory function, or drop the option.")
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _archive(path, input_shapes, trust_pickle)
    if suffix in (".pt", ".pth", ".pkl", ".bin"):
        return _pickle(path, input_shapes, trust_pickle)
    if ":" in spec and not os.path.exists(spec):
        return _factory(spec, input_shapes)
    raise InputError(f"Cannot tell what model {spec!r} names.",
                     "use hf:ID_OR_FOLDER, timm:NAME, torchvision:NAME, package.module:function, a .pt2 archive, or a .pt "
                     "file with --trust-pickle.")


def load_calibration(spec: str | None, example_inputs: Any, *, size: int | None = None) -> Any:
    """``random:N`` (N random batches shaped like the inputs), a ``.pt`` list of tensors/tuples
    (loaded with weights_only=True), ``package.module:function`` returning an iterable, or data
    as users have it (fxcompress.data: an image folder, a .txt / .jsonl file, a datasets folder,
    .npz tensors), preprocessed the model's way. ``example_inputs`` may be the
    :class:`LoadedModel` (its preprocessing is then used); ``size`` keeps the first N examples."""
    if spec is None:
        return None
    loaded = example_inputs if isinstance(example_inputs, LoadedModel) else None
    if loaded is not None:
        example_inputs = loaded.example_inputs
    if size is not None and size <= 0:
        raise InputError(f"--calibration-size {size} is not positive.", "give at least 1.")
    if spec.startswith("random:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            count = 0
        if count <= 0:
            raise InputError(f"Calibration spec {spec!r} needs a positive count.", "write random:16.")
        from fxcompress.runtime.parity import input_sets

        count = min(count, size) if size is not None else count
        call = model_call(None, example_inputs)  # random batches in the example's own form
        return [call.unflatten(flat) if call.structured else flat for flat in input_sets(call.flat, count, seed=1)[1:]]
    path = Path(spec)
    if path.suffix.lower() in (".pt", ".pth", ".npz"):
        check_model_file(path, "Calibration file")  # a missing one is named as a file, not as an unknown spec
    if path.exists() and (path.is_dir() or path.suffix.lower() in (".txt", ".jsonl", ".json", ".npz", ".pt", ".pth")):
        from fxcompress import data

        import sys

        return data.load(path, loaded if loaded is not None else _AsModel(example_inputs), limit=size,
                         progress=sys.stderr.isatty())
    if ":" in spec and not path.exists():
        module_name, _, func_name = spec.partition(":")
        return getattr(importlib.import_module(module_name), func_name)()
    raise InputError(f"Cannot tell what calibration data {spec!r} names.",
                     "use an image folder, a .txt/.jsonl file, a datasets folder, .pt/.npz tensors, random:N, or "
                     "package.module:function.")


class _AsModel:
    """Example inputs where fxcompress.data expects a model (no preprocessing: tensors only)."""

    preprocess = None

    def __init__(self, example_inputs: Any) -> None:
        self.example_inputs = example_inputs


def onnx_inputs(model: Any, shapes: Sequence[tuple[int, ...]] | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs for an ONNX model: one tensor per graph input, of the given ``shapes`` or the file's own.

    Symbolic dimensions (a dynamic batch) become 1. Floating inputs are seeded normal noise,
    integer inputs zeros (valid token ids and masks); dtypes follow the file.
    """
    import numpy as np
    import onnx

    graph_inputs = list(model.graph.input)
    if shapes is not None and len(shapes) != len(graph_inputs):
        raise InputError(f"{len(shapes)} input shapes given for an ONNX model with {len(graph_inputs)} inputs "
                         f"({', '.join(v.name for v in graph_inputs)}).", "give one --input-shape per input, in order.")
    tensors = []
    for i, value in enumerate(graph_inputs):
        tensor_type = value.type.tensor_type
        dims = shapes[i] if shapes else tuple(d.dim_value if d.dim_value > 0 else 1 for d in tensor_type.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            array = np.random.default_rng(i).standard_normal(dims).astype(dtype)
        else:
            array = np.zeros(dims, dtype)
        tensors.append(torch.from_numpy(array))
    return tuple(tensors)
