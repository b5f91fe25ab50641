"""Test helpers for passes, yours and ours: structure, idempotence and numerical parity.

Every pass owes three tests; these helpers make each one line and fail with a message that says
what went wrong::

    from fxcompress.testing import check_idempotent, check_numerics, check_structure

    check_structure(MyPass, model, (x,), disappear=["aten.gelu.default"])
    check_idempotent(MyPass, fxcompress.capture.capture(model, (x,)))
    check_numerics(MyPass, model, (x,), tolerance=1e-5)

A pass is given as a registered name (``"fold-batchnorm"``), a :class:`~fxcompress.infra.pass_base.Pass`
subclass or an instance; keyword options go to its ``Options``. A failed check raises
``AssertionError`` (so pytest shows it like any assert).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Union

import torch
from torch import fx, nn

from fxcompress.capture import capture
from fxcompress.inputs import model_call
from fxcompress.fidelity import OutputMask, output_masks
from fxcompress.infra.pass_base import Pass, PassResult
from fxcompress.infra.registry import create_pass
from fxcompress.numerics import OutputComparison, compare_outputs, flatten_outputs, worst_drift

#: What the helpers accept as "the pass": a registered name, a Pass subclass, or an instance.
PassLike = Union[str, type[Pass], Pass]
#: How an op is named in :func:`check_structure`: the call target itself (``torch.ops.aten.mul.Tensor``)
#: or its string (``"aten.mul.Tensor"``; an overload packet ``"aten.mul"`` covers every overload).
OpLike = Union[str, Callable[..., Any]]


def make_pass(pass_: PassLike, **options: Any) -> Pass:
    """An instance of ``pass_`` with ``options`` applied (an instance is used as is when no options)."""
    if isinstance(pass_, str):
        return create_pass(pass_, options)
    if isinstance(pass_, Pass):
        return type(pass_)(pass_.options, **options) if options else pass_
    if isinstance(pass_, type) and issubclass(pass_, Pass):
        return pass_(options)
    raise TypeError(f"expected a pass name, a Pass subclass or a Pass instance, got {pass_!r}")


def run_pass(pass_: PassLike, graph_module: fx.GraphModule, **options: Any) -> PassResult:
    """Run the pass once the way the PassManager does: the graph is linted and recompiled after a change."""
    result = make_pass(pass_, **options)(graph_module)
    if result.modified:
        result.graph_module.graph.lint()
        result.graph_module.recompile()
    return result


def _graph_module(module: nn.Module, inputs: Any) -> fx.GraphModule:
    """``module`` captured on ``inputs`` (a GraphModule of ATen ops is used as is, copied)."""
    if isinstance(module, fx.GraphModule) and _is_aten_graph(module):
        return copy.deepcopy(module)
    if inputs is None:
        raise TypeError("example inputs are needed to capture a module that is not already a captured GraphModule")
    return capture(module, inputs)


def _is_aten_graph(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes if n.op == "call_function")


def _op_names(target: Any) -> set[str]:
    """The strings an op is known by: ``aten.mul.Tensor`` and its packet ``aten.mul`` (or a qualified name)."""
    if isinstance(target, torch._ops.OpOverload):
        return {str(target), str(target.overloadpacket)}
    if isinstance(target, torch._ops.OpOverloadPacket):
        return {str(target)}
    if isinstance(target, str):
        return {target}
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}".lstrip(".")
    return {name, getattr(target, "__name__", name)}


def op_counts(graph_module: fx.GraphModule) -> Counter[str]:
    """How many calls each op has, under every name it is known by (see :data:`OpLike`)."""
    counts: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            counts.update(_op_names(node.target))
    return counts


def _key(op: OpLike) -> str:
    """The name :func:`op_counts` counts ``op`` under."""
    if isinstance(op, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(op)
    return getattr(op, "__name__", repr(op))


def check_structure(
    pass_: PassLike,
    module: nn.Module,
    inputs: Any = None,
    *,
    appear: Iterable[OpLike] = (),
    disappear: Iterable[OpLike] = (),
    counts: Mapping[OpLike, int] | None = None,
    **options: Any,
) -> PassResult:
    """Run the pass on ``module`` (captured on ``inputs`` unless it already is) and assert its effect.

    Args:
        appear: ops absent before the pass and present after it.
        disappear: ops present before the pass and absent after it.
        counts: exact numbers of calls after the pass (``{"aten.mul.Tensor": 1}``).

    The graph must also still lint. Returns the pass's result, for further asserts on its stats.
    """
    gm = _graph_module(module, inputs)
    before = op_counts(gm)
    result = run_pass(pass_, gm, **options)
    after = op_counts(result.graph_module)
    name = make_pass(pass_, **options).display_name
    problems = []
    for op in appear:
        key = _key(op)
        if before[key] or not after[key]:
            problems.append(f"{key} should appear: {before[key]} call(s) before, {after[key]} after")
    for op in disappear:
        key = _key(op)
        if not before[key] or after[key]:
            problems.append(f"{key} should disappear: {before[key]} call(s) before, {after[key]} after")
    for op, expected in (counts or {}).items():
        key = _key(op)
        if after[key] != expected:
            problems.append(f"{key}: expected {expected} call(s) after the pass, found {after[key]}")
    assert not problems, f"pass '{name}' (stats {result.stats}):\n  " + "\n  ".join(problems)
    return result


def check_idempotent(pass_: PassLike, graph_module: fx.GraphModule, **options: Any) -> PassResult:
    """Run the pass on ``graph_module`` twice; the second run must report ``modified=False`` and
    leave the generated code as it was. Returns the first run's result."""
    result = run_pass(pass_, graph_module, **options)
    code = result.graph_module.code
    again = run_pass(pass_, result.graph_module, **options)
    name = make_pass(pass_, **options).display_name
    assert not again.modified, f"pass '{name}' is not idempotent: a second run reported modified=True ({again.stats})"
    assert again.graph_module.code == code, (
        f"pass '{name}' is not idempotent: a second run reported modified=False but changed the graph:\n"
        f"--- after one run\n{code}\n--- after two runs\n{again.graph_module.code}"
    )
    return result


def check_numerics(
    pass_: PassLike, module: nn.Module, inputs: Any, tolerance: float = 1e-5, *, output_mask: OutputMask = False,
    **options: Any
) -> list[OutputComparison]:
    """Capture ``module`` on ``inputs``, run the pass on a copy, and assert the outputs of the graph
    before and after the pass agree within ``tolerance``.

    ``tolerance`` bounds the drift of every output: its max absolute error divided by the output's
    largest magnitude (see :mod:`fxcompress.numerics`). Returns the per-output comparisons (max_abs,
    max_rel, drift, cosine, and ``masked`` where a mask applied) for tighter asserts.

    ``output_mask`` (default ``False``: every position counts, as a lossless pass must keep even
    padded positions): which output positions the drift counts, in the forms
    :func:`fxcompress.compile` takes (see :mod:`fxcompress.fidelity`), e.g. ``None`` for the
    positions an input named ``attention_mask`` keeps, for a lossy pass on a padded batch.
    """
    before = _graph_module(module, inputs)
    after = run_pass(pass_, copy.deepcopy(before), **options).graph_module
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        reference, got = flatten_outputs(before(*args)), flatten_outputs(after(*args))
    masks = None
    if output_mask is not False:
        names = model_call(module, args).names
        masks = output_masks(output_mask, names, args, [torch.from_numpy(r) for r in reference])
    comparisons = compare_outputs(reference, got, masks)
    drift = worst_drift(comparisons)
    name = make_pass(pass_, **options).display_name
    where = " (over the positions the output mask keeps)" if any(c.masked is not None for c in comparisons) else ""
    assert drift <= tolerance, f"pass '{name}' changed the outputs beyond {tolerance:g}{where}: " + "; ".join(
        f"output {c.index}: max_abs {c.judged.max_abs:.3g}, max_rel {c.judged.max_rel:.3g}, drift {c.judged.drift:.3g}"
        for c in comparisons
    )
    return comparisons
