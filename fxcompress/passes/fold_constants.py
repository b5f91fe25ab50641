"""fold-constants: compute once, at compile time, what depends only on parameters and constants.

A subgraph with no graph input in its ancestry computes the same tensor on every call
(:class:`~fxcompress.analysis.constant_eval.ConstantEvaluator`), so it is run once here and its
result stored as one buffer (``get_attr``). The rewrite is lossless: the stored tensor is the
value the subgraph computes. ``out_bytes <= max(always_fold_bytes, max_growth * bytes of the
parameters it reads)`` bounds the size: an ``expand`` of a few numbers to an activation-sized
tensor stays an ``expand``. Parameters and buffers the folded subgraphs read are left unreferenced
for ``eliminate-dead-code`` to drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.analysis.constant_eval import ConstantEvaluator, nbytes
from fxcompress.infra.pass_base import Pass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.rewrite import RewriteContext


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class FoldConstantsOptions:
    max_growth: float = option(4.0, "largest size ratio of a folded result to the parameters/buffers it is computed from")
    always_fold_bytes: int = option(65536, "results up to this many bytes are folded whatever their growth")
    fold_parameters: bool = option(
        True, "fold subgraphs that read parameters (e.g. weight transposes); the result is stored as a parameter")


@register
class FoldConstantsPass(Pass):
    """Compute subgraphs that depend only on parameters, buffers and constants once, at compile time.

    Each maximal constant subgraph feeding the rest of the graph becomes one buffer (a parameter
    when it is computed from parameters). Results much larger than what they are computed from
    (an ``expand`` to an activation-sized tensor) are not folded; the fold stops below them and
    ``growth_limited`` counts them. Random ops, in-place ops and tensors written in place are
    never folded; nor is a constant returned as a graph output (it would alias a module buffer),
    nor a fake-quantize op (the ONNX exporter turns it into the Q/DQ pair int8 kernels need).
    """

    name = "fold-constants"
    Options = FoldConstantsOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        ctx = RewriteContext(graph_module, self.name)
        evaluator = ConstantEvaluator(graph_module)
        is_const = evaluator.is_constant
        rejections: list[Rejection] = []
        queue = [n for n in graph.nodes if n.op == "call_function" and is_const(n)
                 and any(not is_const(u) for u in n.users)]
        planned: list[tuple[fx.Node, torch.Tensor]] = []
        seen: set[fx.Node] = set()
        growth_limited = 0
        while queue:
            node = queue.pop(0)
            if node in seen:
                continue
            seen.add(node)
            if any(u.op == "output" for u in node.users):
                rejections.append(Rejection(self.name, node.name, "a graph output: a folded buffer would be returned by reference"))
                continue
            if not self.options.fold_parameters and evaluator.reads_parameter(node):
                rejections.append(Rejection(self.name, node.name, "reads parameters and fold_parameters is off"))
                continue
            try:
                value = evaluator.value(node)
            except Exception as exc:  # noqa: BLE001 - an op that does not run eagerly is left in place
                rejections.append(Rejection(self.name, node.name, f"could not be evaluated: {type(exc).__name__}: {exc}"))
                continue
            if not isinstance(value, torch.Tensor):
                continue  # tuples (split) are folded through their getitem users
            size, leaves = nbytes(value), evaluator.leaf_bytes(node)
            allowed = max(self.options.always_fold_bytes, self.options.max_growth * leaves)
            if size > allowed:
                growth_limited += 1
                rejections.append(Rejection(self.name, node.name, (
                    f"result {_format_bytes(size)} is more than {self.options.max_growth:g}x the "
                    f"{_format_bytes(leaves)} it is computed from (max_growth); its inputs are folded instead")))
                queue.extend(i for i in node.all_input_nodes if i.op == "call_function" and is_const(i))
                continue
            planned.append((node, value))
        folded, bytes_added, cone_nodes = 0, 0, []
        # Cones are read before any rewrite: folding one node puts its new get_attr into the
        # cone of a planned node it feeds, and that node is not in the evaluator's order map.
        rewrites = [(node, value, evaluator.cone(node), evaluator.reads_parameter(node)) for node, value in planned]
        # Equal results share one buffer when the first one is defined before the later use.
        stored: list[tuple[torch.Tensor, fx.Node, int]] = []
        for node, value, cone, as_parameter in rewrites:
            position = evaluator.order[node]
            attr = next((a for t, a, at in stored if at < position and t.dtype == value.dtype
                         and t.shape == value.shape and t.device == value.device and torch.equal(t, value)), None)
            if attr is None:
                attr = ctx.new_constant(value, f"folded_{node.name}", node,
                                        [n for n in cone if n.op == "call_function"], as_parameter=as_parameter)
                stored.append((value, attr, position))
                bytes_added += nbytes(value)
            node.replace_all_uses_with(attr)
            cone_nodes.extend(cone)
            folded += 1
        removed = ctx.erase_dead(reversed(cone_nodes))
        stats = {"folded": folded, "nodes_removed": removed, "growth_limited": growth_limited, "bytes_added": bytes_added}
        return PassResult(graph_module, bool(folded), stats, rejections)
