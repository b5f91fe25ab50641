"""The memory check before a compile (fxcompress/infra/cost.py) and the report's time by stage."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.errors import InputError
from fxcompress.infra import cost
from tests.models import ConvBnRelu

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_compile_refuses_before_any_work_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(cost, "available_memory", lambda: 100 * 1024**2)  # 100 MB left
    monkeypatch.delenv(cost.SKIP_ENV, raising=False)
    with pytest.raises(InputError) as info:
        fxcompress.compile(ConvBnRelu().eval(), (X,), "default")
    text = str(info.value)
    assert "needs about 1.0 GB of free memory" in text and "0.1 GB available" in text
    assert "recipe 'default'" in text and cost.SKIP_ENV in text


def test_the_check_can_be_skipped_and_passes_with_enough_memory(monkeypatch):
    monkeypatch.setattr(cost, "available_memory", lambda: 100 * 1024**2)
    monkeypatch.setenv(cost.SKIP_ENV, "1")
    fxcompress.compile(ConvBnRelu().eval(), (X,), ["remove-no-ops"])
    monkeypatch.delenv(cost.SKIP_ENV)
    monkeypatch.setattr(cost, "available_memory", lambda: 64 * 1024**3)
    fxcompress.compile(ConvBnRelu().eval(), (X,), ["remove-no-ops"])


def test_required_memory_grows_with_the_weights():
    small, big = torch.nn.Linear(10, 10), torch.nn.Linear(1000, 1000)
    assert cost.weight_bytes(big) == (1000 * 1000 + 1000) * 4
    assert cost.required_memory(big, "default") - cost.required_memory(small, "default") == pytest.approx(
        (cost.weight_bytes(big) - cost.weight_bytes(small)) * cost.PEAK_FACTOR["*"], abs=2)


def test_report_says_where_the_time_went(tmp_path):
    result = fxcompress.compile(ConvBnRelu().eval(), (X,), "default")
    stages = result.report.stages
    assert list(stages) == ["capture", "passes", "verification", "pipeline", "final check"]
    assert all(v >= 0 for v in stages.values()) and stages["capture"] > 0
    result.export_onnx(tmp_path / "m.onnx")
    assert result.report.stages["export"] > 0 and result.report.stages["parity"] > 0
    assert result.report.to_dict()["stages"]["export"] == result.report.stages["export"]
    assert "Time: capture" in result.report.to_text() and "parity" in result.report.to_text()
    assert sum(stages.values()) <= result.report.seconds + stages["export"] + stages["parity"] + 1e-6


def test_a_half_precision_model_is_estimated_at_its_stored_bytes():
    # a bf16 model is compiled and exported in bf16 (tests/export/test_half_models.py): half the fp32 bytes
    model = torch.nn.Linear(1000, 1000)
    assert cost.weight_bytes(model.to(torch.bfloat16)) == (1000 * 1000 + 1000) * 2
