"""Rules (pattern / check / rewrite) and the driver that applies a rule set to a graph.

A :class:`Rule` finds a candidate anchored at one node (``pattern``), accepts it or says in plain
words why not (``check``), and performs it (``rewrite``). :func:`apply_rules` walks the graph once,
collects the declined candidates as :class:`~fxcompress.infra.pass_base.Rejection` s ("why didn't
it fuse?") and counts the applied ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from torch import fx

from fxcompress.infra.pass_base import Rejection
from fxcompress.rewrite.context import RewriteContext

M = TypeVar("M")


class Rule(Generic[M]):
    """One rewrite: ``pattern`` finds a candidate anchored at a node, ``check`` accepts it (None)
    or says why not, ``rewrite`` performs it. ``stat`` names the count in the pass's stats."""

    name: ClassVar[str] = ""
    stat: ClassVar[str] = ""

    def prepare(self, ctx: RewriteContext) -> None:
        """Called once at the start of every walk, before any ``pattern``: compute here the analyses
        ``pattern`` needs (``ctx.constants``, facts over the whole graph). Nothing by default."""

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
    for rule in rules:
        rule.prepare(ctx)
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
