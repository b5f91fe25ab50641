"""Matching helpers shared by rewrite passes, and the driver that runs pattern / check / rewrite rules.

A :class:`Rule` finds a candidate anchored at one node (``pattern``), accepts it or says in plain
words why not (``check``), and performs it (``rewrite``). :func:`apply_rules` walks the graph once,
collects the declined candidates as :class:`~fxcompress.infra.pass_base.Rejection` s ("why didn't
it fuse?") and counts the applied ones.

The helpers read ATen arguments by their schema names (export writes some positionally, some as
keywords, and leaves defaults out), resolve ``get_attr`` constants, find other readers of a weight
(a weight read twice must not be rewritten as if it were private), add new state to a
GraphModule with a valid ``meta["val"]``, and stamp provenance so graph diffs can align old and new.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from torch import fx, nn

from fxcompress.analysis.aliasing import alias_set, mutated_inputs
from fxcompress.infra.pass_base import Rejection
from fxcompress.inspect.snapshot import PROVENANCE_KEY

aten = torch.ops.aten


# --- arguments by schema name -------------------------------------------------------------------

def _schema_arguments(node: fx.Node) -> list:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"node '{node.name}' does not call an ATen operator")
    return list(target._schema.arguments)


def argument(node: fx.Node, name: str) -> Any:
    """The value of ``node``'s argument ``name``, positional, keyword or the schema's default."""
    for i, arg in enumerate(_schema_arguments(node)):
        if arg.name != name:
            continue
        if i < len(node.args) and not arg.kwarg_only:
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        return arg.default_value if arg.has_default_value() else None
    raise KeyError(f"{node.target} has no argument '{name}'")


def set_argument(node: fx.Node, name: str, value: Any) -> None:
    """Set ``node``'s argument ``name``, extending the positional arguments with defaults if needed."""
    schema_args = _schema_arguments(node)
    for i, arg in enumerate(schema_args):
        if arg.name != name:
            continue
        if arg.kwarg_only or name in node.kwargs:
            node.kwargs = {**node.kwargs, name: value}
            return
        args = list(node.args)
        while len(args) <= i:  # the skipped positions take their schema defaults
            args.append(schema_args[len(args)].default_value)
        args[i] = value
        node.args = tuple(args)
        return
    raise KeyError(f"{node.target} has no argument '{name}'")


# --- types and constants ------------------------------------------------------------------------

def tensor_val(node: Any) -> torch.Tensor | None:
    """The (fake) tensor a node produces, if capture recorded one."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def static_shape(node: Any) -> tuple[int, ...] | None:
    """``node``'s shape when every dimension is a plain integer, else None (unknown or symbolic)."""
    val = tensor_val(node)
    if val is None or not all(type(s) is int for s in val.shape):
        return None
    return tuple(val.shape)


def attribute(root: nn.Module, target: str) -> Any:
    """The object at dotted path ``target`` below ``root`` (what a get_attr node reads)."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


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


# --- rewriting --------------------------------------------------------------------------------------

class RewriteContext:
    """What a rule's ``check`` and ``rewrite`` work with: the module, the pass name, and helpers."""

    def __init__(self, graph_module: fx.GraphModule, pass_name: str) -> None:
        self.graph_module = graph_module
        self.graph = graph_module.graph
        self.pass_name = pass_name
        self.erased: set[fx.Node] = set()
        #: targets of the state this context registered: private to this run, so deleting them
        #: when a later rewrite in the same run replaces them again is safe
        self.created: set[str] = set()
        self._storage_cache: dict[str, int | None] = {}
        self._fake_mode = next(
            (v.fake_mode for n in self.graph.nodes if hasattr(v := n.meta.get("val"), "fake_mode")), None
        )

    def constant(self, value: Any) -> torch.Tensor | None:
        return constant_tensor(self.graph_module, value)

    def sharing_problem(self, value: Any, consumer: fx.Node, what: str) -> str | None:
        """:func:`sharing_problem` with a storage cache kept for this run (attributes are only added)."""
        return sharing_problem(self.graph_module, value, consumer, what, self._storage_cache)

    def new_state(
        self, like: fx.Node, base: str, tensor: torch.Tensor, before: fx.Node, replaces: Any = None
    ) -> fx.Node:
        """Register ``tensor`` next to the state ``like`` reads and return a get_attr reading it.

        The new attribute lives in the module that owns ``like``'s tensor, named ``base`` made
        unique (``weight_fused``, ``weight_fused_1``, ...). It is a Parameter when ``like``'s tensor
        is one (fine-tuning keeps working), a buffer otherwise. The tensor is new, so layers sharing
        the old one are untouched. ``replaces`` (a node or None) goes into the provenance stamp.
        """
        owner_path = str(like.target).rpartition(".")[0]
        owner = self.graph_module.get_submodule(owner_path) if owner_path else self.graph_module
        name, i = base, 1
        while hasattr(owner, name):
            name, i = f"{base}_{i}", i + 1
        old = attribute(self.graph_module, str(like.target))
        tensor = tensor.detach().contiguous()
        if isinstance(old, nn.Parameter):
            owner.register_parameter(name, nn.Parameter(tensor, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(name, tensor)
        target = f"{owner_path}.{name}" if owner_path else name
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(target)
        if self._fake_mode is not None:
            node.meta["val"] = self._fake_mode.from_tensor(attribute(self.graph_module, target), static_shapes=True)
        self.stamp(node, [replaces] if isinstance(replaces, fx.Node) else [])
        self.created.add(target)
        return node

    def call(self, target: Any, args: tuple, like: fx.Node, before: fx.Node) -> fx.Node:
        """A new call of ``target`` before ``before``, carrying ``like``'s metadata (val, layer, trace).

        Our own ``fxcompress_*`` annotations are not copied: they describe ``like``, not the new node.
        """
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args)
        node.meta.update({k: v for k, v in like.meta.items() if not k.startswith("fxcompress_")})
        return node

    def stamp(self, node: fx.Node, replaced: list[fx.Node]) -> None:
        """Record in ``node.meta`` that this pass made ``node`` out of ``replaced`` (and what they came from)."""
        sources: list[str] = []
        for old in replaced:
            earlier = old.meta.get(PROVENANCE_KEY, {}).get("from", [])
            for name in [*earlier, old.name]:
                if name not in sources:
                    sources.append(name)
        node.meta[PROVENANCE_KEY] = {"pass": self.pass_name, "from": sources}

    def take_type(self, node: fx.Node, source: fx.Node) -> None:
        """Give ``node`` the result type of ``source`` (the node whose value it now computes)."""
        for key in ("val", "tensor_meta"):
            if key in source.meta:
                node.meta[key] = source.meta[key]

    def _drop_created(self, target: str) -> None:
        if any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
            return
        owner_path, _, name = target.rpartition(".")
        delattr(self.graph_module.get_submodule(owner_path) if owner_path else self.graph_module, name)
        self.created.discard(target)
        self._storage_cache.pop(target, None)  # the name may be reused for a new tensor

    def erase(self, *nodes: fx.Node) -> None:
        """Erase replaced nodes once unused (consumers first), then the get_attrs they alone read.

        Unrelated dead code is left to ``eliminate-dead-code``; dropping the old parameters is
        also its job, which it can do because nothing reads them any more.
        """
        pending = list(nodes)
        progress = True
        while progress:  # repeat so the order of ``nodes`` does not matter
            progress = False
            for node in list(pending):
                if node in self.erased or node.users or node.op in ("placeholder", "output"):
                    continue
                inputs = [i for i in node.all_input_nodes if i.op == "get_attr"]
                self.graph.erase_node(node)
                self.erased.add(node)
                if node.op == "get_attr" and node.target in self.created:
                    self._drop_created(str(node.target))
                pending.remove(node)
                pending.extend(i for i in inputs if i not in pending)
                progress = True


M = TypeVar("M")


class Rule(Generic[M]):
    """One rewrite: ``pattern`` finds a candidate anchored at a node, ``check`` accepts it (None)
    or says why not, ``rewrite`` performs it. ``stat`` names the count in the pass's stats."""

    name: ClassVar[str] = ""
    stat: ClassVar[str] = ""

    def pattern(self, node: fx.Node) -> M | None:
        raise NotImplementedError

    def check(self, ctx: RewriteContext, match: M) -> str | None:
        return None

    def rewrite(self, ctx: RewriteContext, match: M) -> None:
        raise NotImplementedError


@dataclass
class RuleOutcome:
    """Counts of applied rewrites by stat name, and the declined candidates."""

    counts: dict[str, int]
    rejections: list[Rejection]

    @property
    def modified(self) -> bool:
        return any(self.counts.values())


def apply_rules(graph_module: fx.GraphModule, rules: list[Rule], pass_name: str) -> RuleOutcome:
    """Try ``rules`` in order at every node, in graph order; the first that applies wins.

    Rewrites may create nodes before the anchor and erase nodes before or at it; nodes a rewrite
    created are seen later as inputs of the nodes that follow, so chains collapse in one walk.
    Recompiles the module when anything changed.
    """
    ctx = RewriteContext(graph_module, pass_name)
    counts = {rule.stat: 0 for rule in rules}
    rejections: list[Rejection] = []
    for node in list(graph_module.graph.nodes):
        if node in ctx.erased:
            continue
        for rule in rules:
            match = rule.pattern(node)
            if match is None:
                continue
            reason = rule.check(ctx, match)
            if reason is not None:
                rejections.append(Rejection(rule.name, node.name, reason))
                continue
            rule.rewrite(ctx, match)
            counts[rule.stat] += 1
            break
    outcome = RuleOutcome(counts, rejections)
    if outcome.modified:
        graph_module.recompile()
    return outcome
