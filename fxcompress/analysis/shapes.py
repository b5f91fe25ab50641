"""Shape facts read from ``node.meta["val"]``, and their refresh after a pass changed sizes.

Passes that change tensor sizes (structured pruning) leave every downstream ``meta["val"]``
stale; :func:`refresh_shapes` re-runs fake-tensor propagation with the placeholders' own fake
values, so symbolic batch dimensions (``dynamic_batch``) stay symbolic.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import fx

#: Stand-in for a symbolic size without a hint (only used to compare products of sizes).
_UNKNOWN_SIZE = 7919


def concrete_size(size: object) -> int:
    """An int for a static or symbolic size (a SymInt's hint; a large prime if it has none)."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else _UNKNOWN_SIZE


def tensor_shape(node: object) -> tuple[int, ...] | None:
    """The (concrete) shape of a node's tensor value, or None if it is not a tensor."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(concrete_size(s) for s in val.shape)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def refresh_shapes(graph_module: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None) -> None:
    """Recompute ``node.meta["val"]`` for every node after sizes changed.

    Uses the placeholders' existing fake values (and their fake mode) when there are some, so a
    symbolic batch stays symbolic; otherwise propagates fakes made from ``example_inputs``.
    """
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    if vals and all(isinstance(v, torch.Tensor) for v in vals):
        mode = detect_fake_mode(vals)
        if mode is not None:
            FakeTensorProp(graph_module, mode).propagate_dont_convert_inputs(*vals)
            return
    if example_inputs is None:
        raise ValueError("refresh_shapes needs example inputs when placeholders carry no fake values")
    FakeTensorProp(graph_module).propagate(*example_inputs)
