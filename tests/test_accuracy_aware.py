"""Accuracy-aware compile: ``evaluate=`` scores modules with the user's metric, ``max_metric_drop=``
bounds its drop, and lossy passes keep the most sensitive layers in float until it holds.

The CNN is trained here on scikit-learn's bundled digits (real activations, not random init). The
metric used for the search is a continuous one (agreement of logits with the float model), so that
int8 visibly costs something and the search has work to do; accuracy is checked too.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import InputError
from fxcompress.examples.digits import DigitsCNN, load_digits_data, torch_accuracy, train
from tests.test_api import param_digest


@pytest.fixture(scope="module")
def trained():
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    data = load_digits_data()
    return train(DigitsCNN(width=16), data, epochs=4), data


def _logit_agreement(reference: nn.Module, x: torch.Tensor):
    """Higher is better: minus the mean squared logit error against the float model."""
    with torch.no_grad():
        expected = reference(x)

    def agreement(module: nn.Module) -> float:
        with torch.no_grad():
            return -float((module(x) - expected).pow(2).mean())
    return agreement


def _int8(model, data, **kwargs):
    calibration = [(data.x_train[i:i + 32],) for i in range(0, 256, 32)]
    return fxcompress.compile(model, (data.x_train[:1],), "int8", calibration=calibration, **kwargs)


def _quant_record(result, name="quantize-int8"):
    return next(r for r in result.report.records if r.name.endswith(name))


def test_metric_is_reported_without_a_budget(trained):
    model, data = trained
    result = _int8(model, data, evaluate=lambda m: torch_accuracy(m, data.x_test, data.y_test))
    metric = result.report.metric
    assert metric["baseline"] == pytest.approx(torch_accuracy(model, data.x_test, data.y_test))
    assert metric["compiled"] == pytest.approx(torch_accuracy(result.module, data.x_test, data.y_test))
    assert metric["drop"] == pytest.approx(metric["baseline"] - metric["compiled"])
    assert "metric_trials" not in _quant_record(result).stats  # no budget: no search


def test_budget_already_met_costs_one_trial_and_keeps_everything_int8(trained):
    model, data = trained
    result = _int8(model, data, evaluate=lambda m: torch_accuracy(m, data.x_test, data.y_test), max_metric_drop=0.05)
    stats = _quant_record(result).stats
    assert len(stats["metric_trials"]) == 1 and stats["metric_trials"][0]["accepted"]
    assert stats["float_layers"] == 0
    assert result.report.metric["drop"] <= 0.05


def test_tight_budget_keeps_the_most_sensitive_layers_in_float(trained):
    model, data = trained
    evaluate = _logit_agreement(model, data.x_test)
    full = _int8(model, data, evaluate=evaluate).report.metric["drop"]
    assert full > 0, "int8 should cost the continuous metric something"
    budget = full / 4
    result = _int8(model, data, evaluate=evaluate, max_metric_drop=budget)
    stats = _quant_record(result).stats
    trials = stats["metric_trials"]
    # bisection: first everything int8 (over budget), then at most log2(n)+1 more trials
    assert trials[0]["float_layers"] == 0 and not trials[0]["accepted"]
    n = stats["quantized_layers"] + stats["float_layers"]
    assert 2 <= len(trials) <= 2 + math.ceil(math.log2(n))
    kept = [layer for layer in stats["layers"] if layer.get("reason") == "max_metric_drop"]
    assert kept and stats["quantized_layers"] > 0
    assert result.report.metric["drop"] <= budget
    assert evaluate(result.module) == pytest.approx(result.report.metric["compiled"])
    # the accepted trial with the fewest float layers is what was kept
    best = min(t["float_layers"] for t in trials if t["accepted"])
    assert len(kept) == best


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.layers(x.flatten(1))


def test_dynamic_int8_search_with_the_users_metric(trained):
    _, data = trained
    torch.manual_seed(0)
    model = train(_Mlp(), data, epochs=3)
    evaluate = _logit_agreement(model, data.x_test)
    full = fxcompress.compile(model, (data.x_test[:8],), "int8-dynamic", evaluate=evaluate).report.metric["drop"]
    assert full > 0
    result = fxcompress.compile(model, (data.x_test[:8],), "int8-dynamic", evaluate=evaluate, max_metric_drop=full / 3)
    stats = _quant_record(result, "quantize-int8-dynamic").stats
    assert len(stats["metric_trials"]) >= 2
    assert any(layer.get("reason") == "max_metric_drop" for layer in stats["layers"])
    assert result.report.metric["drop"] <= full / 3


@pytest.mark.parametrize("evaluate, match", [
    (lambda m: 1 / 0, "evaluate raised ZeroDivisionError"),
    (lambda m: "high", "not a finite number"),
    (lambda m: float("nan"), "not a finite number"),
    (42, "must be a callable"),
])
def test_a_broken_metric_is_a_clear_input_error_and_the_model_is_unchanged(evaluate, match):
    model = _Mlp().eval()
    before = param_digest(model)
    with pytest.raises(InputError, match=match):
        fxcompress.compile(model, (torch.randn(2, 1, 8, 8),), "int8-dynamic", evaluate=evaluate, max_metric_drop=0.1)
    assert param_digest(model) == before


@pytest.mark.parametrize("kwargs, match", [
    ({"evaluate": lambda m: 1.0, "max_metric_drop": -0.1}, "max_metric_drop must be a finite number >= 0"),
    ({"evaluate": lambda m: 1.0, "max_metric_drop": float("nan")}, "max_metric_drop must be a finite number >= 0"),
    ({"max_metric_drop": 0.01}, "without evaluate"),
])
def test_bad_budgets_are_refused_before_any_work(kwargs, match):
    with pytest.raises(InputError, match=match):
        fxcompress.compile(_Mlp().eval(), (torch.randn(2, 1, 8, 8),), "int8-dynamic", **kwargs)


def test_a_recipe_that_cannot_search_reports_the_unmet_budget():
    model = _Mlp().eval()
    x = torch.randn(4, 1, 8, 8)
    scores = iter([1.0, 0.0])  # the original scores 1, the compiled module 0
    with pytest.raises(fxcompress.DriftError, match="max_metric_drop"):
        fxcompress.compile(model, (x,), "default", evaluate=lambda m: next(scores), max_metric_drop=0.5)
