"""``torch.save(result.module)`` / ``torch.load``: every preset's module comes back, computes the
same, keeps the model's output structure, and keeps fxcompress's two-faced ops as single calls."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import fxcompress
from fxcompress.export.onnx_export import export_model_proto
from fxcompress.passes.quantize_dynamic import dynamic_int8_linear
from fxcompress.passes.space_to_depth import space_to_depth
from tests.models import TupleOutput, randomize_bn


class StemNet(nn.Module):
    """A strided 3-channel stem with batch norm, and a linear head wide enough for int8-dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.stem(x))).mean((2, 3)))


def _reload(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _calls(module, function) -> int:
    return sum(1 for n in module.graph.nodes if n.target is function)


@pytest.mark.parametrize("recipe", ["default", "int8", "int8-dynamic", "fp16", "prune", "sparse"])
@pytest.mark.parametrize("which", ["stem", "tuple"])
def test_every_preset_round_trips_through_torch_save(recipe, which):
    torch.manual_seed(0)
    if which == "stem":
        model, inputs = randomize_bn(StemNet()).eval(), (torch.randn(2, 3, 32, 32),)
    else:
        model, inputs = TupleOutput().eval(), (torch.randn(2, 6),)
    calibration = [(torch.randn_like(inputs[0]),) for _ in range(3)] if recipe == "int8" else None
    # accuracy is not the point here (a 6-feature toy quantizes poorly); reloading is
    result = fxcompress.compile(model, inputs, recipe, calibration=calibration, tolerance=float("inf"))
    with torch.no_grad():
        expected, original = result.module(*inputs), model(*inputs)
        loaded = _reload(result.module)
        got = loaded(*inputs)
    # same structure as the user's model (a tensor stays a tensor, a tuple a tuple), same values
    assert pytree.tree_structure(expected) == pytree.tree_structure(original) == pytree.tree_structure(got)
    for a, b in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got)):
        assert torch.equal(a, b)


def test_reloaded_modules_keep_space_to_depth_and_dynamic_int8_as_one_call():
    torch.manual_seed(0)
    model, inputs = randomize_bn(StemNet()).eval(), (torch.randn(2, 3, 32, 32),)
    static = fxcompress.compile(model, inputs, "int8", calibration=[(torch.randn(2, 3, 32, 32),)])
    loaded = _reload(static.module)
    assert _calls(static.module, space_to_depth) == _calls(loaded, space_to_depth) == 1
    proto, _ = export_model_proto(loaded, inputs)  # the reloaded module still exports the fast form
    assert Counter(n.op_type for n in proto.graph.node)["SpaceToDepth"] == 1

    dynamic = fxcompress.compile(model, inputs, "int8-dynamic")
    assert _calls(dynamic.module, dynamic_int8_linear) == _calls(_reload(dynamic.module), dynamic_int8_linear) == 1
