"""The ``default`` preset over the model zoo: lossless, never more nodes, and ONNX Runtime agrees.

Every torchvision classifier (random weights, randomised batch-norm statistics) and small-config
transformers BertModel / GPT2Model / ViTModel are captured, run through
``resolve_recipe("default")`` with the VerifyNumerics instrument, and checked: no pass rolled
back, drift against the eager model <= 1e-4, compute nodes never increase (per pass and overall),
and the exported ONNX model matches the eager model in ORT. A representative subset runs in CI;
the full sweep is ``-m slow``. Set ``FXCOMPRESS_SWEEP_LOG=path.jsonl`` to get one line per model.
"""

from __future__ import annotations

import time

import pytest
import torch

import fxcompress
from fxcompress.analysis.graph_stats import count_compute_nodes
from fxcompress.capture import capture
from fxcompress.infra.instruments import RecordDiff, Timing, VerifyNumerics
from fxcompress.infra.recipe import resolve_recipe
from fxcompress.numerics import compare_outputs, flatten_outputs, worst_drift
from benchmarks.common import unzero_weights
from tests import sweep_log
from tests.models import TOO_BIG, randomize_bn

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

DRIFT_LIMIT = 1e-4
CI_MODELS = ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "hf-bert-tiny"]


def _transformers_models() -> dict:
    def bert(tiny: bool):
        width, layers = (32, 2) if tiny else (128, 4)
        config = transformers.BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                                         intermediate_size=2 * width, vocab_size=1000, max_position_embeddings=128)
        return transformers.BertModel(config), (torch.randint(0, 1000, (1, 32)),)

    def gpt2():
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Model(config), (torch.randint(0, 1000, (1, 32)),)

    def vit():
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=64, patch_size=16)
        return transformers.ViTModel(config), (torch.randn(1, 3, 64, 64),)

    return {"hf-bert-tiny": lambda: bert(True), "hf-bert": lambda: bert(False), "hf-gpt2": gpt2, "hf-vit": vit}


HF_MODELS = _transformers_models()
ALL_MODELS = [*torchvision.models.list_models(module=torchvision.models), *HF_MODELS]
SLOW_MODELS = [m for m in ALL_MODELS if m not in CI_MODELS]


def _build(name: str):
    torch.manual_seed(0)
    if name in HF_MODELS:
        model, inputs = HF_MODELS[name]()
        return model.eval(), inputs
    model = unzero_weights(torchvision.models.get_model(name, weights=None))
    size = 299 if name == "inception_v3" else 224
    return randomize_bn(model).eval(), (torch.randn(1, 3, size, size),)


def _sweep_one(name: str) -> dict:
    if name in TOO_BIG:
        pytest.skip(TOO_BIG[name])
    row = sweep_log.read().get(name)  # a resumed sweep re-checks the logged row
    if row is None:
        row = _measure(name)
        sweep_log.append(row)
    assert not row["rolled_back"], row["rolled_back"]
    assert row["drift"] <= DRIFT_LIMIT, f"{name}: drift {row['drift']:.2e}"
    assert not row["passes_adding_nodes"], f"{row['passes_adding_nodes']} added nodes on {name}"
    assert row["nodes_after"] <= row["nodes_before"] and row["all_nodes_after"] <= row["all_nodes_before"]
    assert row.get("ort_passed", True), f"{name}: ORT drift {row.get('ort_drift')}"
    return row


def _measure(name: str) -> dict:
    start = time.perf_counter()
    model, inputs = _build(name)
    with torch.no_grad():
        reference = model(*inputs)
    graph_module = capture(model, inputs)
    nodes_before, all_before = count_compute_nodes(graph_module), len(graph_module.graph.nodes)
    recorder = RecordDiff()
    manager = resolve_recipe("default").build([Timing(), recorder, VerifyNumerics(inputs, reference)])
    compiled = manager(graph_module).graph_module
    with torch.no_grad():
        drift = worst_drift(compare_outputs(flatten_outputs(reference), flatten_outputs(compiled(*inputs))))
    row = {
        "name": name, "nodes_before": nodes_before, "nodes_after": count_compute_nodes(compiled),
        "all_nodes_before": all_before, "all_nodes_after": len(compiled.graph.nodes), "drift": drift,
        "changed": sorted({r.name for r in manager.records if r.modified}),
        "rolled_back": [f"{r.name}: {r.rolled_back}" for r in manager.records if r.rolled_back],
        "passes_adding_nodes": [r.name for r in manager.records if r.nodes_after > r.nodes_before],
    }
    # ORT parity of the exported compiled graph against the eager model (the lead's export API).
    if hasattr(fxcompress, "validate"):
        from fxcompress.export.onnx_export import export_model_proto

        proto, _ = export_model_proto(compiled, inputs)
        parity = fxcompress.validate(proto, model, inputs, random_inputs=1)
        row.update(ort_drift=parity.drift, ort_passed=parity.passed, ort_provider=parity.provider)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


@pytest.mark.parametrize("name", CI_MODELS)
def test_default_preset_subset(name: str) -> None:
    _sweep_one(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_default_preset_sweep(name: str) -> None:
    _sweep_one(name)
