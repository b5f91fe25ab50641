"""Which nodes compute the same value on every call, and what that value is.

A node is constant when no graph input is in its ancestry: a ``get_attr`` of a tensor nobody
writes in place, or a pure call (see :func:`~fxcompress.analysis.aliasing.is_pure_call`) whose
inputs are all constant and whose own result is never written later. Fake-quantize ops are never
constant: folding them is exact, but the ONNX exporter needs them to emit int8 Q/DQ pairs.
Values are computed on demand, on the real parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxcompress.analysis.aliasing import is_pure_call, may_be_mutated
from fxcompress.analysis.attributes import attribute


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s elements."""
    return tensor.numel() * tensor.element_size()


def _is_quantization(node: fx.Node) -> bool:
    """Fake-quantize / Q-DQ ops."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.namespace in ("quantized_decomposed", "quant") or "fake_quantize" in target.name()


class ConstantEvaluator:
    """Which nodes have no graph input in their ancestry, and their values (computed on demand).

    The facts are those of the graph at construction: nodes added later are not constant, and a
    rewrite that changes a constant node's inputs needs a new evaluator.
    """

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        self._values: dict[fx.Node, Any] = {}
        written = {n.target for n in graph_module.graph.nodes if n.op == "get_attr" and may_be_mutated(n)}
        self.constant: dict[fx.Node, bool] = {}
        for node in graph_module.graph.nodes:
            if node.op == "get_attr":
                try:
                    value = attribute(graph_module, str(node.target))
                except AttributeError:
                    value = None
                self.constant[node] = node.target not in written and isinstance(value, torch.Tensor)
            elif node.op == "call_function":
                self.constant[node] = (
                    all(self.constant.get(i, False) for i in node.all_input_nodes)
                    and is_pure_call(node)
                    and not _is_quantization(node)
                    and not may_be_mutated(node)
                )
            else:
                self.constant[node] = False

    def is_constant(self, node: Any) -> bool:
        """True if ``node`` is a node that computes the same value on every call."""
        return isinstance(node, fx.Node) and self.constant.get(node, False)

    def cone(self, node: fx.Node) -> list[fx.Node]:
        """``node`` and its constant ancestors, in graph order."""
        seen, stack = {node}, [node]
        while stack:
            for inp in stack.pop().all_input_nodes:
                if inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return sorted(seen, key=self.order.__getitem__)

    def leaf_bytes(self, node: fx.Node) -> int:
        """Bytes of the parameters/buffers ``node`` is computed from."""
        return sum(nbytes(attribute(self.graph_module, str(n.target))) for n in self.cone(node) if n.op == "get_attr")

    def reads_parameter(self, node: fx.Node) -> bool:
        """True if ``node`` is computed from at least one ``nn.Parameter``."""
        return any(n.op == "get_attr" and isinstance(attribute(self.graph_module, str(n.target)), torch.nn.Parameter)
                   for n in self.cone(node))

    def value(self, node: fx.Node) -> Any:
        """Run ``node``'s constant cone on the real parameters (raises if it is not constant)."""
        if not self.is_constant(node):
            raise ValueError(f"{node.name} depends on graph inputs")
        with torch.no_grad():
            for n in self.cone(node):
                if n in self._values:
                    continue
                if n.op == "get_attr":
                    self._values[n] = attribute(self.graph_module, str(n.target))
                else:
                    args = fx.node.map_arg(n.args, self._values.__getitem__)
                    kwargs = fx.node.map_arg(n.kwargs, self._values.__getitem__)
                    self._values[n] = n.target(*args, **kwargs)
        return self._values[node]

    def small_value(self, node: Any, max_elements: int) -> torch.Tensor | None:
        """The tensor value of a constant node with at most ``max_elements`` elements, else None."""
        if not self.is_constant(node):
            return None
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.numel() > max_elements:
            return None
        try:
            value = self.value(node)
        except Exception:  # noqa: BLE001 - an op that cannot run here is simply not simplified
            return None
        return value if isinstance(value, torch.Tensor) and value.numel() <= max_elements else None
