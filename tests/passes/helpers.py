"""Shared by the pass tests: run one pass the way the PassManager does, and check idempotence."""

from __future__ import annotations

from torch import fx

from fxcompress.infra.pass_base import PassResult
from fxcompress.infra.registry import create_pass


def run_pass(name: str, gm: fx.GraphModule, **options) -> PassResult:
    """Run pass ``name`` (lint + recompile after a change), then assert a second run changes nothing."""
    result = create_pass(name, options)(gm)
    if result.modified:
        result.graph_module.graph.lint()
        result.graph_module.recompile()
    again = create_pass(name, options)(result.graph_module)
    assert not again.modified, f"{name} is not idempotent: second run {again.stats}"
    return result
