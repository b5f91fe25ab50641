"""fxcompress.testing: each helper passes a correct pass and FAILS on a broken one."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxcompress.capture import capture
from fxcompress.infra.pass_base import Pass, PassResult
from fxcompress.testing import check_idempotent, check_numerics, check_structure, op_counts

aten = torch.ops.aten


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _model():
    return ConvBn().eval(), (torch.randn(2, 3, 8, 8),)


class ReluToSigmoid(Pass):
    """Broken on purpose: keeps the structure tidy but changes what the model computes."""

    name = "test-relu-to-sigmoid"

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            if node.target == aten.relu.default:
                node.target = aten.sigmoid.default
                changed += 1
        return PassResult(gm, bool(changed), {"replaced": changed})


class AppendIdentity(Pass):
    """Broken on purpose: numerically exact, but every run adds another ``* 1.0``."""

    name = "test-append-identity"

    def call(self, gm: fx.GraphModule) -> PassResult:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        value = output.args[0][0]
        with gm.graph.inserting_before(output):
            mul = gm.graph.call_function(aten.mul.Tensor, (value, 1.0))
        output.args = ((mul,),)
        return PassResult(gm, True, {"added": 1})


class SilentChange(AppendIdentity):
    """Broken on purpose: changes the graph but says it did not."""

    name = "test-silent-change"

    def call(self, gm: fx.GraphModule) -> PassResult:
        result = super().call(gm)
        gm.recompile()
        return PassResult(result.graph_module, False, {})


def test_check_structure_accepts_fold_batchnorm_and_returns_its_result():
    model, inputs = _model()
    result = check_structure("fold-batchnorm", model, inputs, disappear=["aten.batch_norm"],
                             counts={aten.conv2d.default: 1, "aten.relu": 1})
    assert result.modified


def test_check_structure_fails_when_an_op_does_not_disappear():
    model, inputs = _model()
    with pytest.raises(AssertionError, match="aten.relu.default should disappear: 1 call"):
        check_structure("fold-batchnorm", model, inputs, disappear=[aten.relu.default])


def test_check_structure_fails_when_an_op_does_not_appear_or_count_differs():
    model, inputs = _model()
    with pytest.raises(AssertionError, match="aten.sigmoid.default should appear"):
        check_structure("fold-batchnorm", model, inputs, appear=["aten.sigmoid.default"])
    with pytest.raises(AssertionError, match="expected 2 call"):
        check_structure(ReluToSigmoid, model, inputs, counts={"aten.sigmoid.default": 2})


def test_check_numerics_accepts_an_exact_pass():
    model, inputs = _model()
    comparisons = check_numerics("fold-batchnorm", model, inputs, tolerance=1e-5)
    assert comparisons[0].max_abs < 1e-4


def test_check_numerics_fails_on_a_pass_that_changes_the_outputs():
    model, inputs = _model()
    with pytest.raises(AssertionError, match="test-relu-to-sigmoid' changed the outputs beyond 1e-05: output 0: max_abs"):
        check_numerics(ReluToSigmoid(), model, inputs, tolerance=1e-5)


def test_check_idempotent_accepts_fold_batchnorm():
    model, inputs = _model()
    gm = capture(model, inputs)
    assert check_idempotent("fold-batchnorm", gm).modified
    assert op_counts(gm)["aten.batch_norm"] == 0


def test_check_idempotent_fails_on_a_pass_that_always_rewrites():
    model, inputs = _model()
    # The broken pass is exact, so numerics alone would not catch it.
    check_numerics(AppendIdentity, model, inputs, tolerance=0.0)
    with pytest.raises(AssertionError, match="not idempotent: a second run reported modified=True"):
        check_idempotent(AppendIdentity, capture(model, inputs))


def test_check_idempotent_fails_on_a_pass_that_changes_the_graph_silently():
    model, inputs = _model()
    gm = capture(model, inputs)
    with pytest.raises(AssertionError, match="reported modified=False but changed the graph"):
        check_idempotent(SilentChange, gm)


def test_a_pass_is_named_by_registry_name_class_or_instance_with_options():
    model, inputs = _model()
    with pytest.raises(TypeError, match="expected a pass name"):
        check_idempotent(42, capture(model, inputs))
    with pytest.raises(TypeError, match="example inputs are needed"):
        check_numerics("fold-batchnorm", model, None)
