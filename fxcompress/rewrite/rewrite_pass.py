"""``RewritePass``: a pass that is a set of rules, applied until none applies.

Write the rules (:class:`~fxcompress.rewrite.rule.Rule`), list them in :meth:`RewritePass.rules`
(usually chosen by the pass's options), and the base class does the rest: it walks the graph with
:func:`~fxcompress.rewrite.rule.apply_rules` until a walk changes nothing, sums each rule's count
into the pass's stats (plus ``nodes_removed``), and reports the declined candidates of the last
walk as rejections (``PassResult.rejections``), which ``fxcompress compile --why-not``,
:func:`fxcompress.inspect.why_not.why_not` and the HTML report show.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from fxcompress.infra.pass_base import Pass, PassContractError, PassResult
from fxcompress.rewrite.rule import Rule, apply_rules, validate_rules


class RewritePass(Pass):
    """Base class of rule-based passes: subclasses set ``name`` (and ``Options``) and implement
    :meth:`rules`.

    One walk is not always enough (in ``3 -> 1 -> 2 -> 1`` a pair may only become acceptable after
    the next pair has been rewritten), so walks repeat to a fixed point, which also makes the pass
    idempotent. ``max_walks`` bounds rules that keep rewriting each other's output: reaching it is
    a bug in the rules and raises :class:`~fxcompress.infra.pass_base.PassContractError`.
    """

    max_walks: ClassVar[int] = 50

    def rules(self) -> list[Rule]:
        """The rules this run applies, in priority order (the first that applies at a node wins)."""
        raise NotImplementedError

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        rules = list(self.rules())
        validate_rules(rules)  # before any walk: a v1 rule or a rule without a stat is named at once
        nodes_before = len(graph_module.graph.nodes)
        totals = {rule.stat: 0 for rule in rules}
        modified = False
        for _ in range(self.max_walks):
            outcome = apply_rules(graph_module, rules, self.display_name)
            for stat, count in outcome.counts.items():
                totals[stat] += count
            modified = modified or outcome.modified
            if not outcome.modified:
                stats = {**totals, "nodes_removed": nodes_before - len(graph_module.graph.nodes)}
                # Rejections of the last walk only: earlier ones may have been resolved since.
                return PassResult(graph_module, modified, stats, outcome.rejections)
        raise PassContractError(
            f"pass '{self.display_name}' still rewrote the graph after {self.max_walks} walks: its rules undo or "
            "repeat each other's rewrites; make every rewrite move the graph towards a form no rule matches"
        )
