"""The accuracy-aware search runs its per-layer trials through the executor a compile is given
(compile(..., options=CompileOptions(executor=...))): every sensitivity and metric trial goes through
it, and the choice of float layers is the same as in-process."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.analysis.sensitivity import map_trials, trials_through
from fxcompress.errors import InputError
from fxcompress.sweeps.executor import ProcessExecutor, SequentialExecutor
from tests.models import Residual, randomize_bn


class CountingExecutor(SequentialExecutor):
    """In-process, counting the trials it is handed."""

    def __init__(self) -> None:
        self.trials = 0

    def map_calls(self, function, items):
        self.trials += len(items)
        return super().map_calls(function, items)


def _search(recipe: str = "int8", **kwargs):
    torch.manual_seed(0)
    model = randomize_bn(Residual()).eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)

    def agreement(module) -> float:
        with torch.no_grad():
            return -float((module(x) - expected).pow(2).mean())

    calibration = [(torch.randn(8, 3, 8, 8),) for _ in range(4)]
    result = fxcompress.compile(model, (x[:1],), recipe, calibration=calibration, evaluate=agreement,
                                max_metric_drop=1e-9, tolerance=1.0, **kwargs)
    return next(r for r in result.report.records if r.name.endswith(f"quantize-{recipe}")).stats


def test_search_trials_go_through_the_executor_and_choose_the_same():
    here = _search()
    counting = CountingExecutor()
    through = _search(options=fxcompress.CompileOptions(executor=counting))
    layers = sum("sensitivity" in layer for layer in here["layers"])  # those the search ranked
    metric_trials = len(here["metric_trials"])
    assert metric_trials >= 2  # the tiny budget makes the search bisect
    assert counting.trials == layers + metric_trials  # one sensitivity trial per layer, plus each metric trial
    assert through["metric_trials"] == here["metric_trials"] and through["layers"] == here["layers"]


def test_trial_map_is_bound_only_inside_its_block():
    calls = []
    with trials_through(lambda f, items: calls.append(len(items)) or [f(i) for i in items]):
        assert map_trials(lambda i: i * 2, [1, 2]) == [2, 4]
    assert map_trials(lambda i: i + 1, [1]) == [2] and calls == [2]


def test_process_executor_refuses_closure_trials_clearly():
    with pytest.raises(InputError, match="cannot ship"):
        _search(options=fxcompress.CompileOptions(executor=ProcessExecutor(workers=1)))
