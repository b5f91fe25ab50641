"""Model capture: an ``nn.Module`` plus example inputs -> a GraphModule in fxcompress's one dialect.

The dialect (docs/design.md, decision 1) is what ``torch.export.export(model, args, strict=False)``
produces after unlifting: ATen training-IR ops with ``node.meta["val"]`` and
``node.meta["nn_module_stack"]`` filled in. We then rebuild it as a plain ``torch.fx.GraphModule``
because the unlifted module refuses ``.train()`` and users fine-tune ``result.module``.

What users may pass as example inputs, and the flat tensors capture sees, is
:mod:`fxcompress.inputs`. The user's model is never mutated: capture works on a deep copy put in eval mode, so the caller's
parameters, buffers and training flag are untouched, and passes may rewrite weights freely.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fxcompress.errors import CaptureError, InputError
from fxcompress.graph_meta import CAPTURE_INPUTS
# Input forms have their own module; these names stay importable from here, where they were first documented.
from fxcompress.inputs import FlatCall, ModelCall, StructuredModule, describe_inputs, model_call, normalize_inputs  # noqa: F401

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


def check_finite_outputs(model: nn.Module, outputs: Any) -> None:
    """InputError if the original model's own outputs on the example inputs hold NaN or inf."""
    for leaf in pytree.tree_leaves(outputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise InputError(
                f"{type(model).__name__} itself outputs NaN or inf on the example inputs, so no drift or parity can be "
                "measured against it.",
                "check the example inputs (ranges, masks that exclude every position) and the model's weights; compile "
                "with inputs on which the model's outputs are finite.",
            )


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
    if "cache" in text and "not a known type" in text:
        return (
            "the model returns its KV cache (a transformers Cache object): compile a causal LM with "
            "fxcompress.compile_decoder(model), which takes and returns the cache as named tensors, or call it "
            "with use_cache=False."
        )
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


#: Set on a copy made with ``share_parameters``: copying it again shares its parameters as well.
_SHARES_PARAMETERS = "_fxcompress_shares_parameters"


def private_copy(model: nn.Module, share_parameters: bool = False) -> nn.Module:
    """Deep-copy ``model`` and put the copy in eval mode, so that the caller's object is never touched.

    ``share_parameters``: the copy holds the caller's parameter tensors themselves (modules,
    buffers and training flags are still its own), so that compiling a model does not hold its
    weights twice. Whoever uses such a copy must not write into its parameters in place: compile
    runs its passes under the pass manager's copy-on-write guard and gives the result tensors of
    its own (fxcompress.infra.weights). A copy of such a copy shares them too.

    Raises:
        InputError: ``model`` is not an ``nn.Module`` (a state_dict or a path, say).
        CaptureError: the module cannot be deep-copied.
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}.",
            "pass the nn.Module itself (not its state_dict or a path); load files with the CLI's SPEC syntax.",
        )
    share = share_parameters or getattr(model, _SHARES_PARAMETERS, False)
    memo: dict[int, Any] = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)} if share else {}
    try:
        work = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"{type(model).__name__} cannot be deep-copied ({type(exc).__name__}: {_first_line(exc)}); "
            "fxcompress copies the model so that yours is never modified.",
            "make the module copyable (no open files, locks or generators as attributes).",
        ) from None
    if share:
        object.__setattr__(work, _SHARES_PARAMETERS, True)
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


def dynamic_shapes(inputs: Any, batch: bool, sequence: bool = False) -> Any:
    """torch.export dynamic shapes for ``inputs`` (a tensor, or a pytree of them), or None.

    ``batch``: dim 0 of every input is symbolic. ``sequence``: dim 1 of every rank-2 input
    (``[batch, sequence]``: token ids, attention masks) is symbolic too, so one graph and one
    ONNX file serve every sequence length.
    """
    if not batch and not sequence:
        return None
    # The sequence length takes its range from the model (Dim.DYNAMIC): position tables bound it
    # (BERT: at most 512), which a named Dim would report as a violated constraint.
    batch_dim, sequence_dim = torch.export.Dim("batch"), torch.export.Dim.DYNAMIC

    def dims(tensor: torch.Tensor) -> dict[int, Any]:
        spec: dict[int, Any] = {}
        if batch and tensor.dim() > 0:
            spec[0] = batch_dim
        if sequence and tensor.dim() == 2:
            spec[1] = sequence_dim
        return spec

    return pytree.tree_map(dims, inputs)


def longer_sequences(inputs: Sequence[torch.Tensor], extra: int = 3) -> tuple[torch.Tensor, ...]:
    """``inputs`` with every rank-2 (``[batch, sequence]``) tensor ``extra`` positions longer.

    The new positions repeat each row's last one, so token ids stay in the vocabulary and masks
    stay masks: a second sequence length that parity checks a ``dynamic_sequence`` graph at.
    """
    return tuple(torch.cat([t, t[:, -1:].expand(-1, extra)], dim=1) if t.dim() == 2 else t for t in inputs)


def other_size(module: Callable[..., Any], inputs: Sequence[torch.Tensor],
               places: Sequence[tuple[int, int]]) -> tuple[int, tuple[torch.Tensor, ...]] | None:
    """A second size for one symbolic axis: ``inputs`` with each ``(input index, axis)`` of
    ``places`` (one dimension, shared by those inputs) grown or cut to a size ``module`` runs at.

    Sizes are tried in order (one and a half times, twice, one more, half the example's size),
    and the first one the module runs at is returned with the resized inputs: models that need a
    multiple of their stride, or whose position tables bound a length, take one of them. Grown
    positions repeat the last one along the axis, so token ids stay in the vocabulary and masks
    stay masks. None when the module runs at none of them.
    """
    size = inputs[places[0][0]].shape[places[0][1]]
    tried = []
    for candidate in (size + max(1, size // 2), 2 * size, size + 1, size // 2):
        if candidate < 2 or candidate == size or candidate in tried:
            continue
        tried.append(candidate)
        resized = list(inputs)
        for index, axis in places:
            t = resized[index]
            if candidate > size:
                last = t.narrow(axis, size - 1, 1)
                resized[index] = torch.cat([t, last.expand(*[candidate - size if d == axis else -1 for d in range(t.dim())])], axis)
            else:
                resized[index] = t.narrow(axis, 0, candidate).contiguous()
        try:
            with torch.no_grad():
                module(*(t.clone() for t in resized))
        except Exception:  # noqa: BLE001 - a size the model does not take: try the next one
            continue
        return candidate, tuple(resized)
    return None


@holding_tracing_lock
def capture(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = False,
            dynamic_sequence: bool = False, shapes: Any = None) -> fx.GraphModule:
    """Capture ``model`` as a plain, trainable ``torch.fx.GraphModule`` of ATen ops.

    Args:
        model: any ``nn.Module``, including a GraphModule made by ``torch.fx.symbolic_trace``
            (it is re-captured the same way). It is deep-copied and put in eval mode; the
            caller's object is not touched.
        example_inputs: a tensor, a tuple of positional tensors, a dict of keyword tensors, an
            ``(args, kwargs)`` pair or nested lists/tuples of tensors (see :class:`ModelCall`).
        dynamic_batch: make dimension 0 of every input symbolic (needs an example batch >= 2).
        dynamic_sequence: make dimension 1 of every rank-2 input (token ids, masks) symbolic.
        shapes: an explicit torch.export ``dynamic_shapes`` spec for the positional inputs, used
            instead of ``dynamic_batch`` / ``dynamic_sequence`` (a decoder's cache lengths, see
            fxcompress.capture_decoder).

    Returns:
        A GraphModule with its own copy of every parameter and buffer.

    Raises:
        InputError: example inputs are not tensors.
        CaptureError: torch.export could not trace the model; the message names the construct,
            the model's own source line and a hint.
    """
    work = private_copy(model)
    call = model_call(work, example_inputs)
    inputs = call.flat
    explicit = shapes is not None
    if not explicit:
        shapes = dynamic_shapes(inputs, dynamic_batch, dynamic_sequence) if not call.structured else None
    if call.structured and (dynamic_batch or dynamic_sequence) and not explicit:
        # torch.export matches dynamic shapes to forward()'s parameters by name when called with keywords
        named = dict(zip(call.parameters, call.args))
        if len(named) < len(call.args):
            raise InputError("dynamic_batch / dynamic_sequence need every positional input to be a named parameter of forward().",
                             "pass the inputs as keywords (a dict), or compile without dynamic shapes.")
        shapes = {name: dynamic_shapes(value, dynamic_batch, dynamic_sequence) for name, value in {**named, **call.kwargs}.items()}
    try:
        program = torch.export.export(work, call.args, call.kwargs or None, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; all mean "cannot capture"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{_first_line(exc)}.{_where(exc)}",
            _hint(exc) if not (dynamic_batch or dynamic_sequence or explicit) else
            "with dynamic_batch / dynamic_sequence use an example batch and length of at least 2 and a model whose "
            "forward() does not depend on them; or compile without them.",
        ) from None
    unlifted = program.module()
    # A plain GraphModule (not the unlifted subclass, which refuses .train()) over the same graph.
    graph_module = fx.GraphModule(unlifted, unlifted.graph, class_name="GraphModule")
    if call.structured:
        # One positional parameter per flat input tensor, a tuple of flat outputs: the form every
        # pass, the exporter and parity work on (StructuredModule restores the model's own call).
        graph_module.graph._codegen = fx.graph.CodeGen()
        graph_module.recompile()
    graph_module._tracer_cls = ReloadTracer
    graph_module.meta[CAPTURE_INPUTS] = [(tuple(t.shape), t.dtype) for t in inputs]
    return graph_module
