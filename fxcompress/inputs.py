"""Input forms: what users pass as example inputs and calibration batches, and the flat tensors fxcompress works on.

Users pass what their model takes (docs/design.md, decision 7): a tensor, a tuple of positional
tensors, a dict of keyword tensors (a tokenizer's ``BatchEncoding``), an ``(args, kwargs)`` pair,
or nested lists/tuples of tensors. :func:`model_call` reads any of them into a :class:`ModelCall`
(the model's own call plus the flat tensor tuple that capture, passes, export and parity see);
:class:`FlatCall` runs a model from the flat tensors, :class:`StructuredModule` calls a compiled
graph the way the model is called.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fxcompress.errors import InputError


def normalize_inputs(example_inputs: Any, what: str = "example_inputs") -> tuple[torch.Tensor, ...]:
    """Return example inputs as a tuple of tensors; a single tensor becomes a 1-tuple.

    Raises InputError naming the offending position when something is not a tensor.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        if len(example_inputs) == 0:
            raise InputError(f"{what} is empty.", "pass at least one example tensor, e.g. (torch.randn(1, 3, 224, 224),).")
        for i, item in enumerate(example_inputs):
            if not isinstance(item, torch.Tensor):
                raise InputError(
                    f"{what}[{i}] is a {type(item).__name__}, not a torch.Tensor.",
                    "pass the model's positional inputs as a tuple of tensors.",
                )
        return tuple(example_inputs)
    raise InputError(
        f"{what} must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}.",
        "wrap the inputs in a tuple: (tensor,) or (ids, mask).",
    )


def _path_name(path: Sequence[Any], positional: Sequence[str]) -> str:
    """``input_ids`` / ``images_1`` / ``last_hidden_state``: a pytree key path as an identifier."""
    parts: list[str] = []
    for i, key in enumerate(path):
        if isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.SequenceKey):
            parts.append(positional[key.idx] if i == 0 and key.idx < len(positional) else str(key.idx))
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return re.sub(r"\W", "_", "_".join(parts)) or "output"


def _forward_parameters(model: nn.Module) -> tuple[list[str], bool]:
    """forward()'s parameter names (positional order) and whether it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


@dataclass
class ModelCall:
    """How the model is called, and the same inputs as the flat tuple of tensors fxcompress works on.

    Users pass what their model takes: a tensor, a tuple of positional tensors, a dict of keyword
    tensors (a transformers ``BatchEncoding``), an ``(args, kwargs)`` pair, or nested lists/tuples
    of tensors (detection models' ``[image]``). Capture, passes, export and parity see ``flat``;
    ``names`` name its tensors (keyword names; positional ones from forward()'s signature), which
    the ONNX inputs take. ``structured`` is False for a tensor or a tuple of tensors: those are
    called positionally, exactly as given.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    flat: tuple[torch.Tensor, ...]
    names: list[str]
    spec: Any  # the pytree spec of (args, kwargs)
    structured: bool
    #: filled by :class:`FlatCall` on the first run: names and pytree spec of the model's outputs
    output_names: list[str] | None = None
    output_spec: Any = None
    parameters: list[str] = field(default_factory=list)

    def flatten(self, inputs: Any, what: str = "calibration batch") -> tuple[torch.Tensor, ...]:
        """Another set of inputs in the same form (a calibration batch) as a flat tensor tuple."""
        if not self.structured:
            return normalize_inputs(inputs, what)
        other = model_call(None, inputs, what, self.parameters)
        if other.spec != self.spec:
            raise InputError(
                f"{what} is structured differently from the example inputs (names {other.names} vs {self.names}).",
                "give every batch the same keys and nesting as the example inputs (e.g. the same tokenizer call).",
            )
        return other.flat

    def unflatten(self, flat: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The ``(args, kwargs)`` the model takes, rebuilt around the tensors ``flat``."""
        args, kwargs = pytree.tree_unflatten(list(flat), self.spec)
        return tuple(args), dict(kwargs)


def _plain(inputs: Any) -> bool:
    return isinstance(inputs, torch.Tensor) or (
        isinstance(inputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in inputs))


def model_call(model: nn.Module | None, example_inputs: Any, what: str = "example_inputs",
               parameters: Sequence[str] | None = None) -> ModelCall:
    """Read ``example_inputs`` in any form users pass (see :class:`ModelCall`).

    Raises InputError for a key forward() does not take (listing its parameters), a leaf that is
    not a tensor (naming where), or an empty input.
    """
    names, takes_any_keyword = _forward_parameters(model) if model is not None else (list(parameters or []), True)
    if _plain(example_inputs):
        flat = normalize_inputs(example_inputs, what)
        return ModelCall(flat, {}, flat, [names[i] if i < len(names) else f"input_{i}" for i in range(len(flat))],
                         None, False, parameters=names)
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif (isinstance(example_inputs, tuple) and len(example_inputs) == 2
          and isinstance(example_inputs[0], (list, tuple)) and isinstance(example_inputs[1], Mapping)):
        args, kwargs = tuple(example_inputs[0]), dict(example_inputs[1])
    elif isinstance(example_inputs, (list, tuple)):
        args, kwargs = tuple(example_inputs), {}
    else:
        normalize_inputs(example_inputs, what)  # raises the plain-form error
        raise AssertionError("unreachable")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # an absent optional input (token_type_ids=None)
    if not kwargs and not args:
        raise InputError(f"{what} is empty.", "pass at least one example tensor, e.g. {'input_ids': ids}.")
    unknown = [k for k in kwargs if k not in names]
    if model is not None and unknown and not takes_any_keyword:
        raise InputError(
            f"{what} has the key(s) {unknown} that {type(model).__name__}.forward() does not take; its parameters "
            f"are {names}.",
            "pass only the keys forward() takes (drop or rename the others), as you would call model(**inputs).",
        )
    leaves, spec = pytree.tree_flatten_with_path((args, kwargs))
    flat, flat_names = [], []
    for path, leaf in leaves:
        name = _path_name(path[1:], names) if path and path[0] == pytree.SequenceKey(0) else _path_name(path[1:], [])
        if not isinstance(leaf, torch.Tensor):
            raise InputError(
                f"{what}: the input at '{name}' is of type {type(leaf).__name__}, not a torch.Tensor.",
                "pass tensors only (nested lists or tuples of tensors are fine); build numbers into the model or "
                "pass them as tensors.",
            )
        flat.append(leaf)
        flat_names.append(name)
    return ModelCall(args, kwargs, tuple(flat), flat_names, pytree.tree_structure((args, kwargs)), True, parameters=names)


class FlatCall(nn.Module):
    """``model`` called with the flat tensors of a :class:`ModelCall`, its outputs flattened to a tuple.

    This is how fxcompress runs a model that takes keyword or nested inputs wherever it needs the
    eager reference (drift, parity); it records the outputs' names and structure in ``call``.
    """

    def __init__(self, model: nn.Module, call: ModelCall) -> None:
        super().__init__()
        self.model = model
        self.call = call

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.call.unflatten(flat)
        outputs = self.model(*args, **kwargs)
        leaves, spec = pytree.tree_flatten_with_path(outputs)
        if self.call.output_spec is None:
            self.call.output_spec = pytree.tree_structure(outputs)
            names = [_path_name(path, []) if path else "output" for path, _ in leaves]
            self.call.output_names = [n if n[0].isalpha() else f"output_{n}" for n in names]
        return tuple(leaf for _, leaf in leaves)


class StructuredModule(nn.Module):
    """A compiled module called like the original model: keyword and nested inputs, structured outputs.

    ``graph_module`` is the compiled ``torch.fx.GraphModule`` over the flat input tensors; this
    wrapper shares its parameters, so fine-tuning either trains both, and export uses the graph.
    """

    def __init__(self, graph_module: fx.GraphModule, call: ModelCall) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.call = call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = kwargs if not args else (args if not kwargs else (args, kwargs))
        outputs = self.graph_module(*self.call.flatten(inputs, "the inputs"))
        leaves = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        return pytree.tree_unflatten(leaves, self.call.output_spec) if self.call.output_spec is not None else outputs


def describe_inputs(inputs: Sequence[Any]) -> str:
    """Short human description, e.g. ``(float32[1, 3, 224, 224], int64[1, 128])``; what is not a
    tensor is named by its type."""
    parts = [f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
             for t in inputs]
    return "(" + ", ".join(parts) + ")"


__all__ = ["FlatCall", "ModelCall", "StructuredModule", "describe_inputs", "model_call", "normalize_inputs"]
