"""Pass.runs_on: the one quantized-graph guard. Every pass that must not run on a quantized graph
(or only on one) declares it, and Pass.__call__ skips it with the same reason everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.infra.pass_base import ALREADY_QUANTIZED, NOT_QUANTIZED, Pass, PassResult
from fxcompress.infra.registry import available_passes


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Counting(Pass):
    name = "counting"
    runs_on = "float"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def call(self, graph_module):
        self.calls += 1
        return PassResult(graph_module, False)


@pytest.fixture(scope="module")
def graphs():
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    model = _Mlp().eval()
    quantized = fxcompress.compile(model, (x,), "int8-dynamic", tolerance=1.0).graph_module
    return capture(model, (x,)), quantized


def test_the_passes_that_must_not_requantize_declare_it():
    declared = {name: cls.runs_on for name, cls in available_passes().items() if cls.runs_on is not None}
    assert declared == {"quantize-int8": "float", "quantize-int8-dynamic": "float", "quantize-weights": "float",
                        "smooth-activations": "float", "equalize-attention": "float", "correct-bias": "quantized"}


@pytest.mark.parametrize("name", ["quantize-int8", "quantize-int8-dynamic", "quantize-weights", "smooth-activations",
                                  "equalize-attention"])
def test_every_float_only_pass_skips_a_quantized_graph_with_the_same_reason(graphs, name):
    _, quantized = graphs
    result = available_passes()[name]()(quantized)
    assert not result.modified and result.stats == {"skipped_graph": ALREADY_QUANTIZED}


def test_a_quantized_only_pass_skips_a_float_graph(graphs):
    plain, _ = graphs
    result = available_passes()["correct-bias"]()(plain)
    assert not result.modified and result.stats == {"skipped_graph": NOT_QUANTIZED}


def test_the_guard_runs_before_call_and_lets_a_float_graph_through(graphs):
    plain, quantized = graphs
    counting = _Counting()
    assert counting(quantized).stats == {"skipped_graph": ALREADY_QUANTIZED} and counting.calls == 0
    counting(plain)
    assert counting.calls == 1
