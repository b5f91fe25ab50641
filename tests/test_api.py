"""The public API end to end: compile -> report -> export -> validate -> benchmark."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.errors import DriftError, InputError, PassError, RecipeError
from fxcompress.infra import Pass, PassResult
from tests.models import ConvBnRelu, TupleOutput, WithNoOps, randomize_bn


def param_digest(model: torch.nn.Module) -> list[bytes]:
    return [t.detach().numpy().tobytes() for t in model.state_dict().values()]


def test_compile_report_and_module():
    model = WithNoOps().eval()
    x = torch.randn(2, 16)
    digest = param_digest(model)
    result = fxcompress.compile(model, (x,), recipe="default")
    assert param_digest(model) == digest
    assert isinstance(result.module, torch.fx.GraphModule)
    torch.testing.assert_close(result.module(x), model(x))
    report = result.report
    assert report.recipe == "default"
    assert report.nodes_after < report.nodes_before
    changed = [r for r in report.records if r.modified]
    assert changed and all(r.seconds is not None and r.drift is not None for r in changed)
    assert all(r.nodes_before is not None and r.params_before is not None for r in report.records)
    table = report.table()
    assert "remove-no-ops" in table and "total" in table


def test_compile_accepts_single_tensor_and_tuple_outputs():
    model = TupleOutput().eval()
    x = torch.randn(4, 6)
    result = fxcompress.compile(model, x)
    out = result.module(x)
    torch.testing.assert_close(out[0], model(x)[0])


def test_result_module_is_trainable():
    model = randomize_bn(ConvBnRelu()).eval()
    x = torch.randn(4, 3, 16, 16)
    result = fxcompress.compile(model, (x,))
    module = result.module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    target = torch.randint(0, 10, (4,))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_wrong_inputs_name_the_problem():
    model = ConvBnRelu().eval()
    with pytest.raises(InputError) as info:
        fxcompress.compile(model, (torch.randn(1, 5, 16, 16),))
    message = str(info.value)
    assert "fails on the example inputs (float32[1, 5, 16, 16])" in message
    assert "Fix:" in message


def test_unknown_pass_fails_before_any_work():
    with pytest.raises(RecipeError, match="Unknown pass"):
        fxcompress.compile(ConvBnRelu(), (torch.randn(1, 3, 8, 8),), recipe=["no-such-pass"])


class Scale(Pass):
    """A lossy test pass multiplying the output by 1.5."""

    name = "scale-output"
    lossless = False

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0][0]
        with gm.graph.inserting_before(out):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (value, 1.5))
        scaled.meta["val"] = value.meta["val"]
        out.args = ((scaled,),)
        return PassResult(gm, True)


def test_drift_beyond_tolerance_is_refused_unless_raised():
    model = ConvBnRelu().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(DriftError) as info:
        fxcompress.compile(model, (x,), recipe=[Scale()], tolerance=0.1)
    assert "scale-output" in str(info.value) and "raise the tolerance" in str(info.value)
    result = fxcompress.compile(model, (x,), recipe=[Scale()], tolerance=1.0)
    assert result.report.drift == pytest.approx(0.5, rel=1e-3)  # 0.5 x output / max output


def test_pass_failure_is_named():
    class Fails(Pass):
        name = "fails"

        def call(self, gm):
            raise ValueError("bad graph")

    with pytest.raises(PassError, match="Pass 'fails' failed after \\['remove-no-ops'\\]"):
        fxcompress.compile(ConvBnRelu(), (torch.randn(1, 3, 8, 8),), recipe=["remove-no-ops", Fails()])


def test_dump_dir_writes_numbered_graphs(tmp_path):
    fxcompress.compile(WithNoOps(), (torch.randn(2, 16),), options=fxcompress.CompileOptions(dump_dir=tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "000_captured.txt"
    assert any("remove-no-ops" in n for n in names)


def test_options_carry_the_rarely_changed_settings_and_moved_keywords_say_where_they_went(tmp_path):
    import inspect

    assert list(inspect.signature(fxcompress.compile).parameters) == [
        "model", "example_inputs", "recipe", "calibration", "tolerance", "output_mask", "evaluate", "max_metric_drop",
        "progress", "options"]
    x = torch.randn(2, 16)
    result = fxcompress.compile(WithNoOps(), (x,), options=fxcompress.CompileOptions(dynamic_batch=True))
    assert result.dynamic_batch and not result.dynamic_sequence and result.dynamic_axes is None
    with pytest.raises(InputError, match=r"options object now.*Fix: pass options=fxcompress.CompileOptions\(dynamic_batch=True\)"):
        fxcompress.compile(WithNoOps(), (x,), dynamic_batch=True)
    with pytest.raises(InputError, match="options must be a fxcompress.CompileOptions, got a dict"):
        fxcompress.compile(WithNoOps(), (x,), options={"dynamic_batch": True})
    with pytest.raises(TypeError):  # internal settings are no keywords of compile at all
        fxcompress.compile(WithNoOps(), (x,), dynamic_shapes=None)


def test_reports_read_the_same_way(tmp_path):
    x = torch.randn(2, 16)
    result = fxcompress.compile(WithNoOps(), (x,))
    path = result.export_onnx(tmp_path / "m.onnx")
    reports = [result.report, result.report.parity, fxcompress.validate(path, WithNoOps(), (x,)),
               fxcompress.benchmark(path, (x,), warmup=0, runs=2), result.report.outputs[0]]
    for report in reports:
        assert str(report) == report.to_text() and report.to_text().strip()
        assert isinstance(report.to_dict(), dict)
        assert not hasattr(report, "as_dict") and not hasattr(report, "summary")
    assert reports[3].runs == 2 and reports[3].to_dict()["runs"] == 2


@pytest.mark.parametrize("recipe, exact", [("sparse", True), ("int8-dynamic", False)])
def test_export_parity_is_lossless_unless_a_pass_exports_inexactly(tmp_path, recipe, exact):
    # Sparsity is lossy against the original (its recipe allows any drift) but exact against the
    # compiled module, which is what export parity compares; quantization rounds differently in ORT.
    model = WithNoOps().eval()
    result = fxcompress.compile(model, (torch.randn(2, 16),), recipe)
    assert any(r.modified for r in result.report.records)
    result.export_onnx(tmp_path / "m.onnx")
    tolerance = result.report.parity.tolerance
    if exact:
        assert tolerance == fxcompress.numerics.LOSSLESS_TOLERANCE
    else:
        assert tolerance == result.recipe.tolerance > fxcompress.numerics.LOSSLESS_TOLERANCE
        assert result.report.parity.gate == result.recipe.gate  # relative RMS error and cosine bound it too
