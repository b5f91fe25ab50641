"""Side effects and aliasing of ATen nodes, read from the operator schemas.

Passes that delete or merge nodes need two facts: does a node do something besides produce its
value (mutate an input, assert, run a module, draw random numbers), and can the tensor a node
produces be mutated later through it or one of its views (then a copy cannot be replaced by its
source).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fxcompress.analysis.arguments import argument

aten = torch.ops.aten

_DROPOUTS = frozenset({aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                       aten.feature_alpha_dropout.default})
_SDPA = frozenset({aten.scaled_dot_product_attention.default})
# Factories whose result is uninitialised memory: equal calls do not give equal values.
_UNINITIALISED = frozenset({aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                            aten.empty_strided.default, aten.new_empty_strided.default})


def _schema(node: fx.Node):
    target = node.target
    return target._schema if isinstance(target, torch._ops.OpOverload) else None


def mutated_arg_positions(node: fx.Node) -> list[int]:
    """Positions of the arguments the op writes in place (``relu_``'s 0), per its schema."""
    schema = _schema(node)
    if schema is None:
        return []
    return [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def mutated_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose tensors ``node`` writes in place."""
    schema = _schema(node)
    if schema is None:
        return []
    written = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
        if isinstance(value, fx.Node):
            written.append(value)
    return written


def inactive_dropout(node: fx.Node) -> bool:
    """A dropout that returns its input: ``train=False`` (eval mode) or ``p=0``."""
    if node.op != "call_function" or node.target not in _DROPOUTS:
        return False
    return argument(node, "train") is False or argument(node, "p") == 0


def draws_random_numbers(node: fx.Node) -> bool:
    """True for a seeded-random op (rand, bernoulli, training dropout) called so that it draws.

    torch tags dropout and scaled-dot-product attention ``nondeterministic_seeded`` whatever their
    arguments; eval-mode dropout and attention with ``dropout_p=0`` are deterministic.
    """
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    if target in _SDPA:
        return argument(node, "dropout_p") != 0
    return not inactive_dropout(node)


def has_side_effects(node: fx.Node) -> bool:
    """True if removing ``node`` could change behaviour even when its value is unused.

    Deterministic calls of seeded-random ops are pure (fx's own purity check keeps every one of
    them, so an unused eval-mode attention block would stay alive).
    """
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        return True  # submodules may hold state or checks (e.g. export's _guards_fn)
    if node.op == "get_attr":
        return False
    if mutated_arg_positions(node):
        return True
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
        return draws_random_numbers(node)
    try:
        return node.is_impure()
    except Exception:  # noqa: BLE001 - unknown callables are treated as impure
        return True


def is_view_op(node: fx.Node) -> bool:
    """True if the op returns a view (alias) of its first input (view, reshape, transpose, ...)."""
    schema = _schema(node)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def alias_set(node: fx.Node) -> set[fx.Node]:
    """``node``, the tensors it is a view of, and every view derived from any of them."""
    root = node
    while is_view_op(root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    members, stack = {root}, [root]
    while stack:
        current = stack.pop()
        for user in current.users:
            if is_view_op(user) and user.args and user.args[0] is current and user not in members:
                members.add(user)
                stack.append(user)
    return members


def may_be_mutated(node: fx.Node) -> bool:
    """True if some op writes in place to ``node``'s tensor or to a view sharing its storage."""
    members = alias_set(node)
    return any(
        target in members
        for member in members
        for user in member.users
        for target in mutated_inputs(user)
    )


def is_pure_call(node: fx.Node) -> bool:
    """A call_function whose value depends only on its arguments (no writes, asserts, RNG).

    Uninitialised factories (``empty``) are not pure either: two equal calls give different memory.
    """
    if node.op != "call_function":
        return False
    if not (isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem):
        return False
    return node.target not in _UNINITIALISED and not draws_random_numbers(node) and not has_side_effects(node)
