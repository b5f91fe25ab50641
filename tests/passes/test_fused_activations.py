"""mark-fused-activations (annotation only):
structure, applied once + idempotence, numerics, and a negative case per rejection."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.capture import capture
from fxcompress.graph_meta import FUSED_ACTIVATION, FUSED_INTO
from tests.models import LinearChain as Chain
from tests.passes.helpers import drift, reasons, run_pass

aten = torch.ops.aten


class Activations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        y = F.relu6(self.conv(x))
        z = self.conv2(y)
        y = F.relu(z) + z.sum()  # conv2's output feeds the activation and a sum: not fused
        h = F.gelu(self.fc1(y.mean((2, 3))))
        return torch.sigmoid(self.fc3(F.silu(self.fc2(h))))


def test_mark_fused_activations_annotates_only():
    x = torch.randn(1, 3, 6, 6)
    model = Activations().eval()
    gm = capture(model, (x,))
    code_before = gm.code
    result = run_pass("mark-fused-activations", gm)
    assert result.modified and result.stats["marked"] == 4
    assert result.graph_module.code == code_before
    marks = {n.name: n.meta[FUSED_ACTIVATION] for n in gm.graph.nodes if FUSED_ACTIVATION in n.meta}
    assert marks == {"conv2d": "relu6", "linear": "gelu", "linear_1": "silu", "linear_2": "sigmoid"}
    into = {n.name: n.meta[FUSED_INTO] for n in gm.graph.nodes if FUSED_INTO in n.meta}
    assert into == {v: k for k, v in marks.items()}
    assert reasons(result) == [
        "output of 'conv2d_1' is also used by 'sum_1'; the activation cannot run inside the layer"
    ]
    assert drift(model, gm, x) == 0


def test_mark_fused_activations_clears_stale_marks():
    x = torch.randn(2, 8)
    gm = capture(Chain(8, 6, 4, act=True).eval(), (x,))
    run_pass("mark-fused-activations", gm)
    linear = next(n for n in gm.graph.nodes if n.meta.get(FUSED_ACTIVATION))
    relu = next(n for n in gm.graph.nodes if n.meta.get(FUSED_INTO))
    with gm.graph.inserting_after(linear):  # a later rewrite puts something between them
        neg = gm.graph.call_function(aten.neg.default, (linear,))
    relu.replace_input_with(linear, neg)
    result = run_pass("mark-fused-activations", gm)
    assert result.modified and result.stats == {"marked": 0, "stale_cleared": 2}
    assert FUSED_ACTIVATION not in linear.meta and FUSED_INTO not in relu.meta
