"""The trained digits models of ``fxcompress.examples.trained``, trained once per test session.

Training is most of these tests' time, so each model (at the factory's defaults, seed 0) is built
once and shared; tests never mutate it (``compile`` works on a copy, fine-tuning on ``result.module``).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest

import fxcompress
from fxcompress.examples.trained import TRAINED_MODELS, TrainedModel, prune_and_fine_tune_trained

MODELS = tuple(TRAINED_MODELS)


@functools.lru_cache(maxsize=None)
def trained(name: str) -> TrainedModel:
    pytest.importorskip("sklearn")
    return TRAINED_MODELS[name]()


@functools.lru_cache(maxsize=None)
def _folder(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"fxc-{name}-"))


@functools.lru_cache(maxsize=None)
def fp32_accuracy(name: str) -> float:
    """Accuracy of the uncompiled fp32 export through ORT: every preset's reference."""
    model = trained(name)
    path = fxcompress.compile(model.model, model.example, []).export_onnx(_folder(name) / "fp32.onnx")
    return model.onnx_accuracy(path)


@functools.lru_cache(maxsize=None)
def pruned(name: str):
    """(CompileResult of prune + the model's fine-tuning, path of its ONNX export)."""
    result = prune_and_fine_tune_trained(trained(name))
    return result, result.export_onnx(_folder(name) / "prune.onnx", tolerance=1e-4)
