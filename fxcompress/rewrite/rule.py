"""Rules (pattern / check / rewrite) and the driver that applies a rule set to a graph.

A :class:`Rule` has three methods, and the engine does everything around them:

- ``pattern(ctx, node)`` looks for a candidate anchored at ``node`` and returns a :class:`Match`
  (the node whose value is replaced, ``root``, and the other nodes the rewrite replaces) or None;
- ``check(ctx, match)`` returns None to accept, or :class:`Reject` ``("why not")`` (a plain string
  works too) to decline; the reason becomes a near-miss the user can read (``--why-not``);
- ``rewrite(ctx, match)`` builds the replacement and returns it: a node (it replaces ``root``),
  a ``{matched node: replacement}`` dict, or :data:`NOTHING` when ``root`` has no users.

The engine then replaces the uses, stamps provenance on the nodes the rewrite created (or reused
as the replacement), erases the matched nodes and the inputs that leaves unused, and counts the
rewrite under ``rule.stat``. It refuses, with a :class:`~fxcompress.infra.pass_base.PassContractError`
that says what to change, the mistakes that would otherwise fail silently or loop:
``check`` returning ``True``/``False`` (onnxscript's rewriter accepts with ``return True``; here
that would decline every match), ``rewrite`` returning nothing or a wrong type, and an accepted
match whose inner nodes are read outside it (erasing them would break those readers).

Rules written for the first engine (``pattern(node)``, rewrites that replace and erase by hand and
return None) are refused at the start of the pass with a message naming the v2 signature; every
rule in fxcompress is written on v2, and there is no compatibility layer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Mapping, Sequence, TypeVar

from torch import fx

from fxcompress.infra.pass_base import PassContractError, Rejection
from fxcompress.rewrite.context import RewriteContext

M = TypeVar("M", bound="Match")


class Match:
    """What ``pattern`` found: ``root`` (the node whose value the rewrite replaces) and ``nodes``
    (``root`` first, then the other nodes the rewrite replaces; the engine erases them).

    ``Match(root, *inner, **facts)`` keeps ``facts`` as attributes (``match.factor``). Rules with a
    richer match subclass it (a dataclass works) and define ``root`` as a property, and ``nodes``
    too unless the match is ``root`` alone. Inner nodes must be read only by nodes of the match;
    an input that stays (the tensor a chain starts from) is not part of it.
    """

    def __init__(self, root: fx.Node, *inner: fx.Node, **facts: Any) -> None:
        self._root = root
        self._nodes = _unique([root, *inner])
        self.__dict__.update(facts)

    @property
    def root(self) -> fx.Node:
        return self._root

    @property
    def nodes(self) -> list[fx.Node]:
        return self.__dict__.get("_nodes") or [self.root]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(n.name for n in self.nodes)})"


@dataclass(frozen=True)
class Reject:
    """What ``check`` returns to decline a match: the reason, in words a user can act on."""

    reason: str


class _Nothing:
    def __repr__(self) -> str:
        return "NOTHING"


#: What ``rewrite`` returns when ``root`` has no users and the match is simply erased.
NOTHING: Any = _Nothing()


class Rule(Generic[M]):
    """One rewrite: ``pattern`` finds a candidate anchored at a node, ``check`` accepts it (None)
    or says why not (:class:`Reject`), ``rewrite`` returns the replacement. ``name`` names the rule
    in near-misses, ``stat`` the count in the pass's stats."""

    name: ClassVar[str] = ""
    stat: ClassVar[str] = ""

    def prepare(self, ctx: RewriteContext) -> None:
        """Called once at the start of every walk, before any ``pattern``: compute here the analyses
        over the whole graph that ``pattern`` needs (kept on ``self`` or read from ``ctx``)."""

    def pattern(self, ctx: RewriteContext, node: fx.Node) -> M | None:
        raise NotImplementedError

    def check(self, ctx: RewriteContext, match: M) -> Reject | str | None:
        return None

    def rewrite(self, ctx: RewriteContext, match: M) -> Any:
        raise NotImplementedError


@dataclass
class RuleOutcome:
    """Counts of applied rewrites by stat name, and the declined candidates."""

    counts: dict[str, int]
    rejections: list[Rejection]

    @property
    def modified(self) -> bool:
        return any(self.counts.values())


def _unique(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


def _rule_name(rule: Rule) -> str:
    return rule.name or type(rule).__name__


def validate_rules(rules: Sequence[Rule]) -> None:
    """Refuse rules written for the first engine (``pattern(self, node)``) before anything runs."""
    for rule in rules:
        if not isinstance(rule, Rule):
            raise PassContractError(f"{rule!r} is not a fxcompress.rewrite.Rule; rules() must return Rule instances")
        params = list(inspect.signature(rule.pattern).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
            raise PassContractError(
                f"rule '{_rule_name(rule)}' defines pattern({', '.join(p.name for p in params)}), the signature of "
                "the first rewrite engine; write pattern(self, ctx, node), return a Match, and let rewrite return "
                "the replacement (see docs/writing_passes.md)"
            )
        if not rule.stat:
            raise PassContractError(f"rule '{_rule_name(rule)}' has no stat: set the class attribute stat to the "
                                    "name its count gets in the pass's stats")


def _reason(rule: Rule, node: fx.Node, verdict: Any) -> str | None:
    """The rejection reason of ``check``'s verdict, None for accept; a contract error otherwise."""
    if verdict is None:
        return None
    if isinstance(verdict, Reject):
        verdict = verdict.reason
    if isinstance(verdict, str) and verdict.strip():
        return verdict
    raise PassContractError(
        f"rule '{_rule_name(rule)}': check returned {verdict!r} at node '{node.name}'; check returns None to accept "
        "a match and Reject('why not') (or a non-empty string) to decline it. True and False are not accepted: "
        "onnxscript's rewriter accepts with `return True`, which here would have declined every match"
    )


def _check_match(rule: Rule, node: fx.Node, match: Any) -> None:
    root, nodes = getattr(match, "root", None), getattr(match, "nodes", None)
    if not isinstance(root, fx.Node) or not isinstance(nodes, (list, tuple)) or not nodes or nodes[0] is not root:
        raise PassContractError(
            f"rule '{_rule_name(rule)}': pattern returned {type(match).__name__} at node '{node.name}'; return None "
            "or a Match(root, *inner) whose nodes start with root (a subclass defines root and nodes)"
        )


def _escaping_reader(match: Match, replaced: Mapping[fx.Node, fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """An inner node of ``match`` that is not replaced, and a reader of it outside the match, if any."""
    members = set(match.nodes)
    for inner in match.nodes[1:]:
        if inner in replaced:
            continue
        for user in inner.users:
            if user not in members:
                return inner, user
    return None


def _replacements(rule: Rule, match: Match, result: Any) -> dict[fx.Node, fx.Node]:
    """``rewrite``'s result as {matched node: its replacement}; a contract error for anything else."""
    name = _rule_name(rule)
    if result is NOTHING:
        if match.root.users:
            raise PassContractError(
                f"rule '{name}': rewrite returned NOTHING at '{match.root.name}', which is still read by "
                f"{[u.name for u in match.root.users]}; return the node that replaces it"
            )
        return {}
    if isinstance(result, fx.Node):
        return {match.root: result}
    if isinstance(result, Mapping) and all(k in match.nodes and isinstance(v, fx.Node) for k, v in result.items()):
        return dict(result)
    hint = ("rewrite replaced and erased nodes by hand (the first engine's style): the engine does that now"
            if result is None else f"it returned {type(result).__name__}")
    raise PassContractError(
        f"rule '{name}': rewrite at '{match.root.name}' must return the replacement of the match's root (a node), "
        f"a {{matched node: replacement}} dict, or NOTHING when the root has no users; {hint}"
    )


def _apply(ctx: RewriteContext, rule: Rule, match: Match) -> None:
    """Run ``rule.rewrite`` on an accepted ``match`` and do the rest: uses, provenance, erasure."""
    nodes = list(match.nodes)
    inputs = _unique([i for n in nodes for i in n.all_input_nodes if i not in nodes])
    ctx.begin(match)
    try:
        replacements = _replacements(rule, match, rule.rewrite(ctx, match))
        # checked after the rewrite: a {node: replacement} result may replace an inner node's value too
        escaping = _escaping_reader(match, replacements)
    except BaseException:
        ctx.erase(*reversed(ctx.end()))  # what the rewrite built, unread, goes; the error follows
        raise
    created = ctx.end()
    if escaping is not None:
        ctx.erase(*reversed(created))
        inner, reader = escaping
        raise PassContractError(
            f"rule '{_rule_name(rule)}' accepted a match at '{match.root.name}' whose inner node '{inner.name}' is "
            f"also read by '{reader.name}', outside the match; erasing it would break that reader. Decline such "
            "matches in check (fxcompress.rewrite.other_users says why), or leave the node out of the match"
        )
    for old, new in replacements.items():
        if new is not old:
            old.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    kept = set(replacements.values())
    replaced = sorted(nodes)  # provenance names them in graph order
    for node in created:
        if node not in ctx.erased and not ctx.is_stamped(node):
            ctx.stamp(node, replaced)
    for new in kept:
        if new in nodes and len(nodes) > 1:  # a matched node that absorbed the others (a layer, its batch norm)
            ctx.stamp(new, replaced)
    ctx.erase(*reversed([n for n in nodes if n not in kept]))
    ctx.erase_dead([i for i in inputs if i not in ctx.erased])


def apply_rules(graph_module: fx.GraphModule, rules: list[Rule], pass_name: str) -> RuleOutcome:
    """Try ``rules`` in order at every node, in graph order; the first that applies wins.

    Rewrites may create nodes before the anchor and erase nodes before or at it; nodes a rewrite
    created are seen later as inputs of the nodes that follow, so chains collapse in one walk.
    Recompiles the module when anything changed.
    """
    validate_rules(rules)
    ctx = RewriteContext(graph_module, pass_name)
    counts = {rule.stat: 0 for rule in rules}
    rejections: list[Rejection] = []
    for rule in rules:
        rule.prepare(ctx)
    for node in list(graph_module.graph.nodes):
        if node in ctx.erased:
            continue
        for rule in rules:
            match = rule.pattern(ctx, node)
            if match is None:
                continue
            _check_match(rule, node, match)
            reason = _reason(rule, node, rule.check(ctx, match))
            if reason is not None:
                rejections.append(Rejection(_rule_name(rule), node.name, reason))
                continue
            _apply(ctx, rule, match)
            counts[rule.stat] += 1
            break
    outcome = RuleOutcome(counts, rejections)
    if outcome.modified:
        graph_module.recompile()
    return outcome
