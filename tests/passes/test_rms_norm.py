"""fuse-rms-norm: structure, idempotence, numerics, declined cases, and the opset-23 export."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from fxcompress.capture import capture
from fxcompress.export.onnx_export import export_model_proto
from fxcompress.runtime.session import create_session
from fxcompress.testing import check_numerics, check_structure
from tests.passes.helpers import run_pass

aten = torch.ops.aten


class HandWrittenRmsNorm(nn.Module):
    """transformers' LlamaRMSNorm, then a linear layer: the form Llama, Qwen2 and Mistral capture as."""

    def __init__(self, width: int = 16, form: str = "rsqrt") -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + torch.rand(width))  # trained norms are not all ones
        self.fc = nn.Linear(width, 8)
        self.form = form

    def forward(self, x):
        if self.form == "square-by-mul":
            variance = (x * x).mean(-1, keepdim=True)
        else:
            variance = x.pow(2).mean(-1, keepdim=True)
        if self.form == "divide-by-sqrt":
            normed = x / torch.sqrt(variance + 1e-5)
        else:
            normed = x * torch.rsqrt(variance + 1e-5)
        return self.fc(self.weight * normed)


@pytest.mark.parametrize("form", ["rsqrt", "square-by-mul", "divide-by-sqrt"])
def test_a_hand_written_rms_norm_becomes_one_op_with_its_weight(form):
    torch.manual_seed(0)
    model, x = HandWrittenRmsNorm(form=form).eval(), torch.randn(2, 5, 16) * 3
    result = check_structure("fuse-rms-norm", model, (x,), appear=[aten.rms_norm.default],
                             disappear=[aten.mean.dim, aten.mul.Tensor if form != "divide-by-sqrt" else aten.div.Tensor])
    assert result.stats["rms_norms"] == 1
    (norm,) = [n for n in result.graph_module.graph.nodes if n.target is aten.rms_norm.default]
    weight = result.graph_module.get_parameter(norm.args[2].target) if "weight" in norm.args[2].target else None
    assert weight is not None and torch.equal(weight, model.weight)  # the model's weight, absorbed
    assert norm.args[1] == [16] and norm.args[3] == pytest.approx(1e-5)
    check_numerics("fuse-rms-norm", model, (x,), tolerance=1e-6)


def test_idempotent_and_a_norm_without_weight_gets_ones():
    class NoWeight(nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) + 1

    x = torch.randn(3, 8)
    result = run_pass("fuse-rms-norm", capture(NoWeight(), (x,)))  # asserts a second run changes nothing
    (norm,) = [n for n in result.graph_module.graph.nodes if n.target is aten.rms_norm.default]
    assert torch.equal(getattr(result.graph_module, norm.args[2].target), torch.ones(8))
    check_numerics("fuse-rms-norm", NoWeight(), (x,), tolerance=1e-6)


def test_declines_a_norm_whose_parts_are_read_elsewhere_or_over_other_dims():
    class Shared(nn.Module):
        def forward(self, x):
            inverse = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return x * inverse, inverse  # the inverse RMS is an output too

    class OtherDim(nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)  # over dim 1 of 3: not an RMS norm

    x = torch.randn(2, 4, 8)
    shared = run_pass("fuse-rms-norm", capture(Shared(), (x,)))
    assert not shared.modified and "also read elsewhere" in shared.rejections[0].reason
    other = run_pass("fuse-rms-norm", capture(OtherDim(), (x,)))
    assert not other.modified and not other.rejections  # not a candidate at all


def test_exports_as_one_rms_normalization_at_opset_23_with_parity():
    torch.manual_seed(0)
    model, x = HandWrittenRmsNorm().eval(), torch.randn(2, 5, 16) * 3
    gm = run_pass("fuse-rms-norm", capture(model, (x,))).graph_module
    proto, _ = export_model_proto(gm, (x,), opset=23)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["RMSNormalization"] == 1 and not ops["ReduceMean"] and not ops["Sqrt"]
    got = create_session(proto, "cpu").session.run(None, {proto.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    # earlier opsets have no RMSNormalization: the exporter writes the norm out again
    proto18, _ = export_model_proto(gm, (x,))
    assert not Counter(n.op_type for n in proto18.graph.node)["RMSNormalization"]
