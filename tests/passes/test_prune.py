"""prune-channels and the `prune` preset: structure, exactness on zero channels, idempotence,
ORT parity, options, refusals, fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.analysis.macs import count_macs
from fxcompress.capture import capture
from fxcompress.errors import RecipeError
from fxcompress.infra.context import CompileContext
from fxcompress.passes.prune import PruneChannelsPass


class Net(nn.Module):
    """Residual add, depthwise conv, concat and flatten -> linear: every coupling kind at once.

    Groups: R = {a, c} (residual, 8 channels; dw follows it), B = {b} (6), D = {d} (4), fc (output).
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 2 * 2, 5)

    def forward(self, x):
        r = torch.relu(self.a(x))
        y = torch.relu(self.c(torch.relu(self.b(torch.relu(self.dw(r)))))) + r
        z = torch.relu(self.bn(torch.cat([y, torch.relu(self.d(y))], 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 2), 1))


ZERO = {"R": [1, 3, 5, 7], "B": [0, 2, 4], "D": [1, 2]}  # half of every prunable group


def zeroed_net() -> Net:
    """A Net whose ZERO channels are exactly zero everywhere they are produced or read, so
    removing them (and only them) cannot change the output."""
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for bn_p in (net.bn.running_mean, net.bn.running_var, net.bn.weight, net.bn.bias):
            bn_p.copy_(torch.rand(12) + 0.5)
        r, b, d = ZERO["R"], ZERO["B"], ZERO["D"]
        for conv in (net.a, net.c):
            conv.weight[r] = 0
            conv.bias[r] = 0
        net.dw.weight[r] = 0
        net.dw.bias[r] = 0
        net.b.weight[:, r] = 0
        net.d.weight[:, r] = 0
        net.b.weight[b] = 0
        net.b.bias[b] = 0
        net.c.weight[:, b] = 0
        net.d.weight[d] = 0
        net.d.bias[d] = 0
        cat_channels = r + [8 + i for i in d]
        net.bn.weight[cat_channels] = 0  # bn(0) = bias - mean*w/std: zero scale and shift too
        net.bn.bias[cat_channels] = 0
        net.bn.running_mean[cat_channels] = 0
        fc = net.fc.weight.view(5, 12, 4)
        fc[:, cat_channels] = 0
    return net


def run_pass(model: nn.Module, inputs, **options):
    gm = capture(model, inputs)
    p = PruneChannelsPass(options)
    p.bind(CompileContext(tuple(inputs)))
    return gm, p(gm)


def test_removes_exactly_the_zero_channels_and_keeps_outputs():
    net, x = zeroed_net(), (torch.randn(2, 3, 4, 4),)
    expected = net(*x)
    _, result = run_pass(net, x, ratio=0.5)
    gm = result.graph_module
    assert result.modified
    assert gm.get_parameter("a.weight").shape == (4, 3, 3, 3)
    assert gm.get_parameter("dw.weight").shape == (4, 1, 3, 3)
    assert gm.get_parameter("b.weight").shape == (3, 4, 3, 3)
    assert gm.get_parameter("c.weight").shape == (4, 3, 3, 3)
    assert gm.get_parameter("d.weight").shape == (2, 4, 1, 1)
    assert gm.get_parameter("bn.weight").shape == (6,)
    assert gm.get_parameter("fc.weight").shape == (5, 24)
    torch.testing.assert_close(gm(*x), expected, rtol=1e-5, atol=1e-6)
    gm.graph.lint()


def test_stats_report_channels_macs_params_and_skips():
    net, x = zeroed_net(), (torch.randn(1, 3, 4, 4),)
    gm, result = run_pass(net, x, ratio=0.5)
    stats = result.stats
    assert stats["channels"]["a"] == "8->4" and stats["channels"]["b"] == "6->3" and stats["channels"]["d"] == "4->2"
    assert stats["macs_after"] < stats["macs_before"] and stats["params_after"] < stats["params_before"]
    assert stats["macs_after"] == count_macs(result.graph_module)
    assert stats["skipped"] == [{"group": "fc", "reason": "reaches the model output (output shapes never change)"}]
    assert [r.node for r in result.rejections] == ["fc"]
    # meta["val"] was refreshed: the pruned conv's recorded shape is the new one
    conv = next(n for n in result.graph_module.graph.nodes if n.op == "call_function" and n.args[1].target == "a.weight")
    assert conv.meta["val"].shape[1] == 4


def test_second_run_changes_nothing():
    net, x = zeroed_net(), (torch.randn(1, 3, 4, 4),)
    _, first = run_pass(net, x)
    p = PruneChannelsPass()
    p.bind(CompileContext(x))
    assert p(first.graph_module).modified is False


def test_nothing_prunable_is_reported_not_changed():
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    _, result = run_pass(model, (torch.randn(1, 3, 4, 4),))
    assert result.modified is False and result.stats["prunable"] == 0 and result.stats["skipped"]


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"ratio": -0.1}, {"overrides": {"a": 1.5}}, {"round_to": 0},
                                 {"importance": "random"}])
def test_bad_options_are_clear_errors(bad):
    with pytest.raises(RecipeError):
        PruneChannelsPass(bad)


def test_overrides_and_round_to():
    net, x = zeroed_net(), (torch.randn(1, 3, 4, 4),)
    _, result = run_pass(net, x, ratio=0.5, overrides={"b": 0.0})
    assert result.graph_module.get_parameter("b.weight").shape[0] == 6
    assert result.graph_module.get_parameter("a.weight").shape[0] == 4
    _, rounded = run_pass(net, x, ratio=0.5, round_to=4)
    assert rounded.graph_module.get_parameter("b.weight").shape[0] == 4  # 3 kept, rounded up to 4


def test_global_allocation_removes_the_ratio_overall():
    torch.manual_seed(0)
    net, x = Net().eval(), (torch.randn(1, 3, 4, 4),)
    _, result = run_pass(net, x, ratio=0.5, allocation="global")
    gm = result.graph_module
    kept = sum(gm.get_parameter(f"{n}.weight").shape[0] for n in ("a", "b", "d"))
    assert result.modified and abs(kept - 9) <= 1  # 18 prunable channels in total


def test_bn_scale_importance_keeps_the_largest_gammas():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, 5.0, 0.2, 3.0]))
    _, result = run_pass(model, (torch.randn(1, 3, 4, 4),), ratio=0.5, importance="bn-scale")
    assert result.graph_module.get_parameter("1.weight").tolist() == pytest.approx([5.0, 3.0])


def test_prune_preset_exports_with_ort_parity_and_trains(tmp_path):
    net, x = zeroed_net(), (torch.randn(1, 3, 4, 4),)
    result = fxcompress.compile(net, x, recipe="prune")
    assert result.report.tolerance == float("inf")
    path = result.export_onnx(tmp_path / "pruned.onnx", tolerance=1e-4)
    assert path.exists() and result.report.parity.passed
    # result.module fine-tunes: gradients reach the smaller parameters
    module = result.module.train()
    loss = module(torch.randn(4, 3, 4, 4)).sum()
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    assert grads and all(g is not None for g in grads)


def test_prune_recipe_options_from_toml(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "prune"\n[options.prune-channels]\nratio = 0.25\n')
    net, x = zeroed_net(), (torch.randn(1, 3, 4, 4),)
    result = fxcompress.compile(net, x, recipe=str(recipe))
    shapes = {n: p.shape[0] for n, p in result.module.named_parameters() if n.endswith("weight")}
    assert 6 in shapes.values()  # a/c: 8 channels, a quarter removed
