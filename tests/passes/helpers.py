"""Shared by the pass tests: run one pass the way the PassManager does (checking idempotence), compare
numerics, find what a pass made."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.graph_meta import PROVENANCE_KEY
from fxcompress.infra.pass_base import PassResult
from fxcompress.testing import check_idempotent
from fxcompress.capture import capture
from fxcompress.numerics import compare_outputs, flatten_outputs, worst_drift
from tests.models import randomize_bn


def run_pass(name: str, gm: fx.GraphModule, **options) -> PassResult:
    """Run pass ``name`` (lint + recompile after a change), then assert a second run changes nothing."""
    return check_idempotent(name, gm, **options)


def assert_matches(model: nn.Module, gm: fx.GraphModule, *inputs: torch.Tensor, tol: float = 1e-5) -> None:
    """``gm`` computes what ``model`` does on ``inputs``, within drift ``tol``."""
    with torch.no_grad():
        reference, got = flatten_outputs(model(*inputs)), flatten_outputs(gm(*inputs))
    assert worst_drift(compare_outputs(reference, got)) <= tol


def provenance_of(gm: fx.GraphModule, pass_name: str) -> list[fx.Node]:
    """The nodes pass ``pass_name`` made (their provenance stamp names it)."""
    return [n for n in gm.graph.nodes if n.meta.get(PROVENANCE_KEY, {}).get("pass") == pass_name]


def drift(model: nn.Module, gm: fx.GraphModule, *inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return worst_drift(compare_outputs(flatten_outputs(model(*inputs)), flatten_outputs(gm(*inputs))))


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


def reasons(result) -> list[str]:
    return [r.reason for r in result.rejections]


def outputs_signature(gm: fx.GraphModule) -> list[tuple]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [(tuple(a.meta["val"].shape), a.meta["val"].dtype) for a in out.args[0]]


def prepared(model: nn.Module, *inputs: torch.Tensor) -> tuple[nn.Module, fx.GraphModule]:
    model = randomize_bn(model).eval()
    return model, capture(model, inputs)
