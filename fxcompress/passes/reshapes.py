"""collapse-reshapes: chains of shape-only ops become one reshape, chains of permutations one
permute (or nothing when they cancel); lossless.

Reshape-like ops keep the row-major order of elements, so a chain of them equals one reshape to
the final (static) shape, or nothing if that is the input's shape. Permutations compose. A chain
whose tensors are written in place anywhere is left alone (a near-miss says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.infra.pass_base import option
from fxcompress.infra.registry import register
from fxcompress.rewrite import PERMUTE_OPS, Match, Rule, RewritePass, RewriteContext, permutation, static_shape, writers

aten = torch.ops.aten


_RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                       aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim,
                       aten.squeeze.dims})


def _chain_ending_at(node: fx.Node, members: frozenset) -> list[fx.Node] | None:
    """The longest run of ``members`` ops ending at ``node`` whose inner links have one user each.

    None unless ``node`` ends the run (its only user is not one more member reading it).
    """
    if node.op != "call_function" or node.target not in members:
        return None
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in members and users[0].args[0] is node:
        return None
    chain = [node]
    current = node.args[0]
    while (isinstance(current, fx.Node) and current.op == "call_function" and current.target in members
           and len(current.users) == 1):
        chain.insert(0, current)
        current = current.args[0]
    return chain


@dataclass
class _ChainOfViews(Match):
    chain: list[fx.Node]

    @property
    def root(self) -> fx.Node:
        return self.chain[-1]

    @property
    def nodes(self) -> list[fx.Node]:
        """The end of the chain and the links before it read by nothing else (a shared permute a
        cancelling chain passes through stays for its other readers)."""
        nodes = [self.chain[-1]]
        for node in reversed(self.chain[:-1]):
            if not set(node.users) <= set(nodes):
                break
            nodes.append(node)
        return nodes

    @property
    def source(self) -> fx.Node:
        return self.chain[0].args[0]

    @property
    def end(self) -> fx.Node:
        return self.chain[-1]


def _mutation_problem(chain: _ChainOfViews) -> str | None:
    written = [w for n in (chain.source, *chain.chain) for w in writers(n)] if isinstance(chain.source, fx.Node) else []
    if not written:
        return None
    return (
        f"'{written[0].name}' writes in place to a tensor of this chain; merging its views could change what it writes"
    )


def _replace_chain(ctx: RewriteContext, match: _ChainOfViews, target: Any, argument_: Any, identity: bool) -> fx.Node:
    return match.source if identity else ctx.call(target, (match.source, argument_))


class _ReshapeChainRule(Rule[_ChainOfViews]):
    """view / reshape / flatten / unflatten / (un)squeeze chain  =>  one reshape (or nothing)."""

    name = "reshape-chain"
    stat = "reshape_chains"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _ChainOfViews | None:
        chain = _chain_ending_at(node, _RESHAPES)
        return _ChainOfViews(chain) if chain is not None and len(chain) >= 2 else None

    def check(self, ctx: RewriteContext, match: _ChainOfViews) -> str | None:
        if static_shape(match.source) is None or static_shape(match.end) is None:
            return "the chain has dynamic (symbolic) shapes; only static reshapes are merged"
        return _mutation_problem(match)

    def rewrite(self, ctx: RewriteContext, match: _ChainOfViews) -> fx.Node:
        shape = static_shape(match.end)
        return _replace_chain(ctx, match, aten.reshape.default, list(shape), shape == static_shape(match.source))


class _PermuteChainRule(Rule[_ChainOfViews]):
    """permute / transpose / t chain  =>  one permute, or nothing when they cancel."""

    name = "permute-chain"
    stat = "permute_chains"

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> _ChainOfViews | None:
        chain = _chain_ending_at(node, PERMUTE_OPS)
        if chain is None or any(permutation(n) is None for n in chain):
            return None
        if _is_identity(_compose(chain)):
            return _ChainOfViews(chain)
        cancelling = _cancelling_extension(chain)
        if cancelling is not None:
            return _ChainOfViews(cancelling)
        # a lone permute is only worth touching when it does nothing
        return _ChainOfViews(chain) if len(chain) >= 2 else None

    def check(self, ctx: RewriteContext, match: _ChainOfViews) -> str | None:
        return _mutation_problem(match)

    def rewrite(self, ctx: RewriteContext, match: _ChainOfViews) -> fx.Node:
        order = _compose(match.chain)
        return _replace_chain(ctx, match, aten.permute.default, list(order), _is_identity(order))


def _is_identity(order: tuple[int, ...]) -> bool:
    return order == tuple(range(len(order)))


def _cancelling_extension(chain: list[fx.Node]) -> list[fx.Node] | None:
    """``chain`` extended back through permutes that have other users, up to where it all cancels.

    Merging through a shared permute would add a copy (ONNX transposes materialize), but a chain
    that cancels is removed outright: the shared permutes stay for their other users and
    ``chain``'s end reads their source directly, which costs nothing.
    """
    extended = list(chain)
    current = chain[0].args[0]
    while permutation(current) is not None:
        extended.insert(0, current)
        if _is_identity(_compose(extended)):
            return extended
        current = current.args[0]
    return None


def _compose(chain: list[fx.Node]) -> tuple[int, ...]:
    """One permutation equal to applying ``chain``'s in order: ``out.shape[i] == in.shape[p[i]]``."""
    order = list(range(len(permutation(chain[0]))))
    for node in chain:
        step = permutation(node)
        order = [order[step[i]] for i in range(len(step))]
    return tuple(order)


@dataclass(frozen=True)
class CollapseReshapesOptions:
    reshapes: bool = option(True, "merge chains of view/reshape/flatten/unflatten/(un)squeeze into one reshape")
    permutes: bool = option(True, "merge chains of permute/transpose into one permute; drop chains that cancel")


@register
class CollapseReshapesPass(RewritePass):
    """Collapse chains of shape-only ops and of dimension permutations.

    Reshape-like ops keep the row-major order of elements, so a chain of them equals one reshape
    to the final (static) shape, or nothing if that is the input's shape. Permutations compose.
    A chain whose tensors are written in place anywhere (``relu_`` on a view) is left alone:
    merging views could turn a view into a copy and lose the write.
    """

    name = "collapse-reshapes"
    Options = CollapseReshapesOptions
    lossless = True

    def rules(self) -> list[Rule]:
        options = self.options
        return [*([_ReshapeChainRule()] if options.reshapes else []),
                *([_PermuteChainRule()] if options.permutes else [])]
