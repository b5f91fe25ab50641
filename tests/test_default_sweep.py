"""The ``default`` preset over the model zoo: lossless, never more nodes, and ONNX Runtime agrees.

Every zoo model (benchmarks/zoo.py: torchvision classifiers, small-config transformers BertModel /
GPT2Model / ViTModel and a handful of timm architectures; random weights, randomised batch-norm
statistics) runs as one ``fxcompress.sweep`` trial with recipe ``default``, the very trial
``fxcompress sweep`` runs, and is checked: no pass rolled back, drift against the eager model
<= 1e-4, compute nodes never increase (per pass and overall), and the exported ONNX model matches
the eager model in ORT. A representative subset runs in CI; the full sweep is ``-m slow``.
Set ``FXCOMPRESS_SWEEP_LOG=path.jsonl`` to log (and resume) one line per model, and
``FXCOMPRESS_SWEEP_WORKERS=N`` or ``FXCOMPRESS_SWEEP_RAY=auto`` for isolated trials (tests/sweep_log.py).
"""

from __future__ import annotations

import pytest

import fxcompress
from benchmarks import zoo
from tests import sweep_log
from tests.models import TOO_BIG

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

DRIFT_LIMIT = 1e-4
CI_MODELS = ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "hf-bert-tiny", *zoo.TIMM_CI]
ALL_MODELS = zoo.names(timm=zoo.timm_available())
SLOW_MODELS = [m for m in ALL_MODELS if m not in CI_MODELS]


def _sweep_one(name: str) -> dict:
    if name in TOO_BIG:
        pytest.skip(TOO_BIG[name])
    if name.startswith("timm-"):
        pytest.importorskip("timm")
    # A logged row is re-checked, not re-run (a resumed sweep).
    (row,) = fxcompress.sweep([zoo.spec(name)], ["default"], log=sweep_log.path(), progress=False,
                              **sweep_log.executor_options()).records
    assert row["status"] == "ok", f"{name}: {row['status']}: {row.get('error')}"
    assert not row["rolled_back"], row["rolled_back"]
    assert row["drift"] <= DRIFT_LIMIT, f"{name}: drift {row['drift']:.2e}"
    assert not row["passes_adding_nodes"], f"{row['passes_adding_nodes']} added nodes on {name}"
    assert row["nodes_after"] <= row["nodes_before"] and row["all_nodes_after"] <= row["all_nodes_before"]
    assert row["parity_passed"], f"{name}: ORT drift {row.get('parity_drift')}"
    return row


@pytest.mark.parametrize("name", CI_MODELS)
def test_default_preset_subset(name: str) -> None:
    _sweep_one(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_default_preset_sweep(name: str) -> None:
    _sweep_one(name)
