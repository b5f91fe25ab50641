"""Load models named on the command line: ``torchvision:NAME``, ``package.module:function``,
``.pt2`` torch.export archives, and (only with explicit trust) pickled modules.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fxcompress.capture import model_call, normalize_inputs
from fxcompress.errors import InputError, ModelFileError, UntrustedFileError

#: Input sizes of torchvision classifiers whose default is not 224.
_TORCHVISION_SIZES = {"inception_v3": 299}
MAX_MODEL_FILE_BYTES = 8 * 1024**3


@dataclass
class LoadedModel:
    """A model and the example inputs to capture it with (a tuple of tensors, or the keyword /
    nested form a factory returned, e.g. a tokenizer's dict)."""

    model: nn.Module
    example_inputs: Any
    description: str


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


def _torchvision(name: str, shapes) -> LoadedModel:
    try:
        import torchvision
    except ImportError:
        raise InputError("torchvision is not installed.", "pip install torchvision (it is in fxcompress's test extra).") from None
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        raise InputError(f"torchvision has no classification model {name!r}.",
                         f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models().")
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = _TORCHVISION_SIZES.get(name, 224)
    return LoadedModel(model, _inputs_from_shapes(shapes, (1, 3, size, size), name), f"torchvision:{name} (random weights)")


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


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelFileError(f"Model file {path} does not exist.", "check the path.")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"Model file {path} is empty.", "the file was truncated: save it again.")
    if size > MAX_MODEL_FILE_BYTES:
        raise ModelFileError(f"Model file {path} is {size / 1e9:.1f} GB, over the {MAX_MODEL_FILE_BYTES / 1e9:.0f} GB limit.",
                             "check that this is the model you meant.")


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
    _check_file(path)
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
    _check_file(path)
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


def load_model(spec: str, input_shapes: Sequence[tuple[int, ...]] | None = None, *, trust_pickle: bool = False) -> LoadedModel:
    """Resolve a model SPEC: ``torchvision:NAME``, ``package.module:function``, ``file.pt2``,
    or a pickled ``file.pt``/``.pth`` (only with ``trust_pickle``)."""
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _archive(path, input_shapes, trust_pickle)
    if suffix in (".pt", ".pth", ".pkl", ".bin"):
        return _pickle(path, input_shapes, trust_pickle)
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], input_shapes)
    if ":" in spec and not os.path.exists(spec):
        return _factory(spec, input_shapes)
    raise InputError(f"Cannot tell what model {spec!r} names.",
                     "use torchvision:NAME, package.module:function, a .pt2 archive, or a .pt file with --trust-pickle.")


def load_calibration(spec: str | None, example_inputs: Any) -> Any:
    """``random:N`` (N random batches shaped like the inputs), a ``.pt`` list of tensors/tuples
    (loaded with weights_only=True), or ``package.module:function`` returning an iterable."""
    if spec is None:
        return None
    if spec.startswith("random:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            count = 0
        if count <= 0:
            raise InputError(f"Calibration spec {spec!r} needs a positive count.", "write random:16.")
        from fxcompress.runtime.parity import input_sets

        call = model_call(None, example_inputs)  # random batches in the example's own form
        return [call.unflatten(flat) if call.structured else flat for flat in input_sets(call.flat, count, seed=1)[1:]]
    path = Path(spec)
    if path.suffix in (".pt", ".pth"):
        _check_file(path)
        try:
            data = torch.load(str(path), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"Calibration file {path} could not be loaded safely ({type(exc).__name__}: {str(exc)[:160]}).",
                                 "save a list of tensors or of tuples of tensors with torch.save.") from None
        return [item if isinstance(item, (tuple, list)) else (item,) for item in data]
    if ":" in spec:
        module_name, _, func_name = spec.partition(":")
        return getattr(importlib.import_module(module_name), func_name)()
    raise InputError(f"Cannot tell what calibration data {spec!r} names.", "use random:N, a .pt file, or package.module:function.")


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
