"""Model capture: an ``nn.Module`` plus example inputs -> a GraphModule in fxcompress's one dialect.

The dialect (DESIGN.md, decision 1) is what ``torch.export.export(model, args, strict=False)``
produces after unlifting: ATen training-IR ops with ``node.meta["val"]`` and
``node.meta["nn_module_stack"]`` filled in. We then rebuild it as a plain ``torch.fx.GraphModule``
because the unlifted module refuses ``.train()`` and users fine-tune ``result.module``.

The user's model is never mutated: capture works on a deep copy put in eval mode, so the caller's
parameters, buffers and training flag are untouched, and passes may rewrite weights freely.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import traceback
from typing import Any, Sequence

import torch
from torch import fx, nn

from fxcompress.errors import CaptureError, InputError
from fxcompress.graph_meta import CAPTURE_INPUTS

_TORCH_DIR = os.path.dirname(torch.__file__)


#: torch.export, torch.onnx.export and fake-tensor shape propagation keep process-wide tracing
#: state (the dispatch-mode stack): two threads tracing at once corrupt each other ("Trying to pop
#: empty mode stack", "ProxyTorchDispatchMode slot already occupied"). Every fxcompress call that
#: traces holds this lock, so compiling from several threads of one process is safe: the calls
#: queue and run one at a time (use processes to compile in parallel).
TRACING_LOCK = threading.RLock()


def holding_tracing_lock(function):
    """Decorator: run ``function`` while holding :data:`TRACING_LOCK` (re-entrant)."""

    @functools.wraps(function)
    def serialized(*args, **kwargs):
        with TRACING_LOCK:
            return function(*args, **kwargs)

    return serialized


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


def describe_inputs(inputs: Sequence[torch.Tensor]) -> str:
    """Short human description, e.g. ``(float32[1, 3, 224, 224], int64[1, 128])``."""
    parts = [f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in inputs]
    return "(" + ", ".join(parts) + ")"


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch's own package: usually the model's own line."""
    frames = traceback.extract_tb(exc.__traceback__)
    outside = [f for f in frames if not f.filename.startswith(_TORCH_DIR) and "fxcompress" not in f.filename]
    return outside[-1] if outside else None


def _where(exc: BaseException) -> str:
    frame = user_frame(exc)
    if frame is None:
        return ""
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f" It happened at {frame.filename}:{frame.lineno} in {frame.name}{code}."


def _hint(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    if "data-dependent" in text or "datadependent" in text or "guardondatadependent" in text:
        return (
            "the model branches on or sizes a tensor by its values (e.g. `if x.sum() > 0:` or "
            "`x.nonzero()`); make that decision static (a constructor argument), or express it with "
            "torch.cond, then compile again."
        )
    if "unsupported" in text or "not supported" in text:
        return (
            "replace the unsupported construct with plain tensor operations, or move it out of "
            "forward() (pre/post-processing), then compile again."
        )
    return (
        "check that `model(*example_inputs)` runs eagerly and that forward() uses only tensor "
        "operations on its inputs; move Python-side effects (printing, file I/O, .item() checks) "
        "out of forward()."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_eager(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """Run the model eagerly under no_grad; a failure becomes an InputError at the user's line."""
    try:
        with torch.no_grad():
            # Clones: a forward() that writes into its input (x.mul_(2)) must not change the
            # caller's tensors, nor the inputs the next run (capture, parity) sees.
            return model(*(t.clone() for t in inputs))
    except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit
        raise InputError(
            f"{type(model).__name__} fails on the example inputs {describe_inputs(inputs)}: "
            f"{type(exc).__name__}: {_first_line(exc)}.{_where(exc)}",
            "pass inputs of the shapes and dtypes forward() expects (one tensor per positional argument).",
        ) from None


def private_copy(model: nn.Module) -> nn.Module:
    """Deep-copy ``model`` and put the copy in eval mode, so that the caller's object is never touched.

    Raises:
        InputError: ``model`` is not an ``nn.Module`` (a state_dict or a path, say).
        CaptureError: the module cannot be deep-copied.
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}.",
            "pass the nn.Module itself (not its state_dict or a path); load files with the CLI's SPEC syntax.",
        )
    try:
        work = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"{type(model).__name__} cannot be deep-copied ({type(exc).__name__}: {_first_line(exc)}); "
            "fxcompress copies the model so that yours is never modified.",
            "make the module copyable (no open files, locks or generators as attributes).",
        ) from None
    return work.eval()


_LEAF_FUNCTIONS: list = []


def register_leaf_function(function):
    """Keep calls of ``function`` (a pass's two-faced op: eager in PyTorch, one node in ONNX) as
    calls when a saved compiled module is loaded back. Returns ``function``."""
    _LEAF_FUNCTIONS.append(function)
    return function


class ReloadTracer(fx.Tracer):
    """The tracer ``torch.load`` uses to rebuild a saved compiled module.

    A pickled GraphModule is rebuilt by tracing its generated code with the tracer class recorded
    in the module. torch.export's own tracer cannot be rebuilt that way (``torch.save(result.module)``
    then fails to load), and fx's plain Tracer would inline the functions registered with
    :func:`register_leaf_function`, so their ONNX face would be lost on re-export.
    """

    def __init__(self) -> None:
        # The passes' leaf functions are registered: importing fxcompress imports fxcompress.passes.
        super().__init__(autowrap_functions=tuple(_LEAF_FUNCTIONS))


@holding_tracing_lock
def capture(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = False) -> fx.GraphModule:
    """Capture ``model`` as a plain, trainable ``torch.fx.GraphModule`` of ATen ops.

    Args:
        model: any ``nn.Module``, including a GraphModule made by ``torch.fx.symbolic_trace``
            (it is re-captured the same way). It is deep-copied and put in eval mode; the
            caller's object is not touched.
        example_inputs: a tensor or a tuple of tensors, one per positional argument of forward().
        dynamic_batch: make dimension 0 of every input symbolic (needs an example batch >= 2).

    Returns:
        A GraphModule with its own copy of every parameter and buffer.

    Raises:
        InputError: example inputs are not tensors.
        CaptureError: torch.export could not trace the model; the message names the construct,
            the model's own source line and a hint.
    """
    work = private_copy(model)
    inputs = normalize_inputs(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else {} for t in inputs)
    try:
        program = torch.export.export(work, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; all mean "cannot capture"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{_first_line(exc)}.{_where(exc)}",
            _hint(exc) if not dynamic_batch else
            "with dynamic_batch=True use an example batch of at least 2 and a model whose forward() does not "
            "depend on the batch size; or compile without dynamic_batch.",
        ) from None
    unlifted = program.module()
    # A plain GraphModule (not the unlifted subclass, which refuses .train()) over the same graph.
    graph_module = fx.GraphModule(unlifted, unlifted.graph, class_name="GraphModule")
    graph_module._tracer_cls = ReloadTracer
    graph_module.meta[CAPTURE_INPUTS] = [(tuple(t.shape), t.dtype) for t in inputs]
    return graph_module
