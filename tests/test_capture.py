"""Capture: the one dialect, no mutation of the user's model, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from fxcompress.capture import capture, normalize_inputs
from fxcompress.errors import CaptureError, InputError
from tests.models import ConvBnRelu, DataDependent, TwoInputs, randomize_bn


def state_hash(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().clone().numpy().tobytes() for k, v in model.state_dict().items()}


def test_capture_gives_aten_graph_with_meta():
    model = randomize_bn(ConvBnRelu()).eval()
    gm = capture(model, (torch.randn(1, 3, 16, 16),))
    assert type(gm) is fx.GraphModule or type(gm).__name__ == "GraphModule"
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.default in targets
    assert torch.ops.aten.batch_norm.default in targets
    conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert tuple(conv.meta["val"].shape) == (1, 8, 16, 16)
    assert "conv" in str(conv.meta["nn_module_stack"])


def test_captured_module_is_trainable_and_owns_its_weights():
    model = ConvBnRelu().train()
    before = state_hash(model)
    gm = capture(model, (torch.randn(2, 3, 16, 16),))
    gm.train()
    loss = gm(torch.randn(2, 3, 16, 16)).sum()
    loss.backward()
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert state_hash(model) == before
    assert model.training  # the user's training flag is untouched


def test_symbolic_trace_module_is_recaptured():
    model = ConvBnRelu().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 16, 16)
    gm = capture(traced, (x,))
    assert torch.ops.aten.conv2d.default in {n.target for n in gm.graph.nodes}
    torch.testing.assert_close(gm(x), model(x))


def test_several_inputs_of_different_dtypes():
    model = TwoInputs().eval()
    ids = torch.randint(0, 50, (2, 5))
    feats = torch.randn(2, 4)
    gm = capture(model, (ids, feats))
    torch.testing.assert_close(gm(ids, feats), model(ids, feats))


def test_uncapturable_model_names_the_user_line_and_hints():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(4),))
    message = str(info.value)
    assert "torch.export could not capture DataDependent" in message
    assert "models.py" in message and "if x.sum() > 0" in message
    assert "torch.cond" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ([], "is empty"),
        (("not a tensor",), "example_inputs[0] is a str"),
        (3.0, "must be a tensor or a tuple of tensors"),
    ],
)
def test_bad_example_inputs(bad, fragment):
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        normalize_inputs(bad)


def test_not_a_module():
    with pytest.raises(InputError, match="must be a torch.nn.Module"):
        capture({"weight": torch.zeros(1)}, (torch.zeros(1),))
