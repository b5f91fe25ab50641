"""The public rewrite engine: rules (pattern / check with a reason / rewrite), the rewrite context,
matchers, and the driver. Passes of fxcompress and of its users are written on it; see
docs/writing_passes.md.

A rule's ``pattern(ctx, node)`` returns a :class:`Match`, ``check`` returns None or
:class:`Reject` ``("why not")``, and ``rewrite`` returns the replacement: the engine replaces the
uses, stamps provenance, erases the match and reports declined matches as
``PassResult.rejections`` (see :mod:`fxcompress.rewrite.rule`).
"""

from fxcompress.infra.pass_base import Rejection
from fxcompress.rewrite.context import RewriteContext
from fxcompress.rewrite.matchers import (
    PERMUTE_OPS,
    WeightedLayer,
    argument,
    attribute,
    constant_tensor,
    describe_constant_problem,
    has_argument,
    is_call,
    other_readers,
    other_users,
    permutation,
    same_type,
    set_argument,
    sharing_problem,
    static_shape,
    tensor_val,
    weighted_layer,
    writers,
)
from fxcompress.rewrite.rewrite_pass import RewritePass
from fxcompress.rewrite.rule import NOTHING, Match, Reject, Rule, RuleOutcome, apply_rules

__all__ = [
    "NOTHING", "Match", "Reject", "PERMUTE_OPS", "Rejection", "RewriteContext", "RewritePass", "Rule", "RuleOutcome", "WeightedLayer", "apply_rules",
    "argument", "attribute", "constant_tensor", "describe_constant_problem", "has_argument", "is_call", "other_readers",
    "other_users", "permutation", "same_type", "set_argument", "sharing_problem", "static_shape", "tensor_val",
    "weighted_layer", "writers",
]
