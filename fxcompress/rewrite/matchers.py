"""Matchers: read ATen arguments by schema name, resolve constants, find sharing, permutations, layers.

The helpers read ATen arguments by their schema names (export writes some positionally, some as
keywords, and leaves defaults out), resolve ``get_attr`` constants, find other readers of a weight
(a weight read twice must not be rewritten as if it were private), recognise dimension
permutations and conv/linear layers. Rules use them in ``pattern`` and ``check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from fxcompress.analysis.aliasing import alias_set, mutated_inputs
from fxcompress.analysis.arguments import argument, has_argument, set_argument  # re-exported for rules
from fxcompress.analysis.attributes import attribute

aten = torch.ops.aten


# --- types and constants ------------------------------------------------------------------------

def is_call(node: Any, *targets: Any) -> bool:
    """``node`` is an fx call of one of ``targets`` (False for constants and other values)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def tensor_val(node: Any) -> torch.Tensor | None:
    """The (fake) tensor a node produces, if capture recorded one."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_type(a: Any, b: Any) -> bool:
    """True if nodes ``a`` and ``b`` produce tensors of the same shape, dtype and device."""
    va, vb = tensor_val(a), tensor_val(b)
    return va is not None and vb is not None and (va.shape, va.dtype, va.device) == (vb.shape, vb.dtype, vb.device)


def static_shape(node: Any) -> tuple[int, ...] | None:
    """``node``'s shape when every dimension is a plain integer, else None (unknown or symbolic)."""
    val = tensor_val(node)
    if val is None or not all(type(s) is int for s in val.shape):
        return None
    return tuple(val.shape)


def writers(node: fx.Node) -> list[fx.Node]:
    """Nodes that write in place to ``node``'s tensor or a view sharing its storage.

    The same facts as :func:`fxcompress.analysis.aliasing.may_be_mutated`, but naming the writers
    so a rejection can say which op is in the way.
    """
    members = alias_set(node)
    return [user for member in members for user in member.users if any(t in members for t in mutated_inputs(user))]


def constant_tensor(graph_module: fx.GraphModule, value: Any) -> torch.Tensor | None:
    """The tensor behind a constant argument: a get_attr nobody mutates, or a Python number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float64)
    if isinstance(value, fx.Node) and value.op == "get_attr" and not writers(value):
        tensor = attribute(graph_module, str(value.target))
        return tensor if isinstance(tensor, torch.Tensor) else None
    return None


def _storage_key(graph_module: fx.GraphModule, target: str, cache: dict[str, int | None]) -> int | None:
    """Where the tensor at ``target`` keeps its data (None for non-tensors and empty tensors)."""
    if target not in cache:
        tensor = attribute(graph_module, target)
        tensor_ok = isinstance(tensor, torch.Tensor) and tensor.numel() > 0
        cache[target] = tensor.untyped_storage().data_ptr() if tensor_ok else None
    return cache[target]


def other_readers(
    graph_module: fx.GraphModule, attr_node: fx.Node, consumer: fx.Node, cache: dict[str, int | None] | None = None
) -> list[fx.Node]:
    """Nodes other than ``consumer`` that read ``attr_node``'s tensor (through any get_attr).

    Tied weights are found by storage, so a parameter registered under two names counts as one.
    ``cache`` (target -> storage) may be shared between calls while no attribute is reassigned.
    """
    cache = {} if cache is None else cache
    storage = _storage_key(graph_module, str(attr_node.target), cache)
    readers = []
    for node in graph_module.graph.nodes:
        if node.op != "get_attr":
            continue
        same = node.target == attr_node.target or (
            storage is not None and _storage_key(graph_module, str(node.target), cache) == storage
        )
        if same:
            readers.extend(user for user in node.users if user is not consumer)
    return readers


def describe_constant_problem(graph_module: fx.GraphModule, value: Any, what: str) -> str | None:
    """None if ``value`` is a constant tensor (or absent); else why it is not, naming ``what``."""
    if value is None or constant_tensor(graph_module, value) is not None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        names = ", ".join(f"'{w.name}'" for w in writers(value))
        return f"{what} is written in place by {names}, so it is not a constant" if names else f"{what} is not a tensor"
    source = f"'{value.name}'" if isinstance(value, fx.Node) else repr(value)
    return f"{what} is computed at run time by {source}, not a constant"


def sharing_problem(
    graph_module: fx.GraphModule, value: Any, consumer: fx.Node, what: str, cache: dict[str, int | None] | None = None
) -> str | None:
    """None if ``consumer`` is the only reader of constant ``value``; else which other nodes read it."""
    if not (isinstance(value, fx.Node) and value.op == "get_attr"):
        return None
    readers = other_readers(graph_module, value, consumer, cache)
    if not readers:
        return None
    names = ", ".join(f"'{r.name}'" for r in readers[:3]) + (" ..." if len(readers) > 3 else "")
    return (
        f"{what} '{value.target}' is also read by {names}; "
        "rewriting it would duplicate the tensor instead of replacing it"
    )


def other_users(
    node: fx.Node, expected: fx.Node, consequence: str = "rewriting it would change what they see"
) -> str | None:
    """None if ``expected`` is ``node``'s only user; else a reason naming the other users."""
    others = [u for u in node.users if u is not expected]
    if not others:
        return None
    names = ", ".join(f"'{u.name}'" for u in others[:3]) + (" ..." if len(others) > 3 else "")
    return f"output of '{node.name}' is also used by {names}; {consequence}"


# --- dimension permutations -------------------------------------------------------------------------

PERMUTE_OPS = frozenset({aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default,
                         aten.mT.default, aten.swapaxes.default, aten.swapdims.default})


def permutation(node: Any) -> tuple[int, ...] | None:
    """The dims ``node`` permutes its input by (``out.shape[i] == in.shape[p[i]]``), or None.

    Covers permute, transpose, t, .T, .mT, swapaxes/swapdims; needs only the input's rank.
    """
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in PERMUTE_OPS:
        return None
    source = tensor_val(node.args[0])
    if source is None:
        return None
    rank = source.dim()
    order = list(range(rank))
    if rank == 0:
        return ()
    target = node.target
    if target is aten.permute.default:
        return tuple(int(d) % rank for d in node.args[1])
    if target is aten.numpy_T.default:
        return tuple(reversed(order))
    if target is aten.t.default:
        first, second = (0, 1) if rank == 2 else (0, 0)  # t() of a 1-D tensor is the identity
    elif target is aten.mT.default:
        first, second = rank - 2, rank - 1
    else:
        first, second = int(node.args[1]) % rank, int(node.args[2]) % rank
    order[first], order[second] = order[second], order[first]
    return tuple(order)


# --- conv / linear layers -------------------------------------------------------------------------

LayerKind = Literal["conv", "conv_transpose", "linear"]

_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_CONV_TRANSPOSE = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_LINEAR = {aten.linear.default}


@dataclass(frozen=True)
class WeightedLayer:
    """A conv, conv-transpose or linear node seen as ``y = W (*) x + b`` with output channels."""

    node: fx.Node
    kind: LayerKind

    @property
    def weight(self) -> Any:
        return argument(self.node, "weight")

    @property
    def bias(self) -> Any:
        return argument(self.node, "bias")

    @property
    def groups(self) -> int:
        return 1 if self.kind == "linear" else int(argument(self.node, "groups"))

    @property
    def channel_dim(self) -> int | None:
        """The output dimension that indexes output channels (1 for batched convs, last for linear)."""
        out, weight = tensor_val(self.node), tensor_val(self.weight)
        if out is None or weight is None:
            return None
        if self.kind == "linear":
            return out.dim() - 1
        return out.dim() - (weight.dim() - 2) - 1  # spatial dims trail the channel dim

    def scale_output_channels(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``weight`` with output channel ``o`` multiplied by ``scale[o]``.

        Conv and linear weights lead with output channels. A transposed conv's weight is
        ``[in, out / groups, *kernel]``: output channel ``o`` of group ``g`` is column
        ``o - g * out / groups`` of that group's rows, so the scale is laid out per group.
        """
        if self.kind != "conv_transpose":
            return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        groups, per_group = self.groups, weight.shape[1]
        grouped = weight.reshape(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
        factors = scale.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
        return (grouped * factors).reshape(weight.shape)


def weighted_layer(node: Any) -> WeightedLayer | None:
    """``node`` as a :class:`WeightedLayer`, or None if it is not a conv/conv-transpose/linear call."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in _CONV:
        return WeightedLayer(node, "conv")
    if node.target in _CONV_TRANSPOSE:
        return WeightedLayer(node, "conv_transpose")
    if node.target in _LINEAR:
        return WeightedLayer(node, "linear")
    if node.target is aten.convolution.default:
        return WeightedLayer(node, "conv_transpose" if argument(node, "transposed") else "conv")
    return None


