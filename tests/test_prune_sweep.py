"""`prune` over the model zoo: every torchvision classifier and transformers BERT/ViT configs.

Each model must export with ORT parity against its own pruned module, and either shrink (fewer
MACs) or name every group it skipped and why. Torch-Pruning (if installed) runs on the same
models so coverage can be compared: models that shrink and still run.

The full sweep is slow (``-m slow``); a handful of architectures run in CI.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

import fxcompress
from fxcompress.passes.presets import prune as prune_preset
from tests import sweep_log
from tests.models import TOO_BIG

CI_MODELS = ["resnet18"]  # plus BERT below; the rest of the zoo runs in the slow sweep


def _torchvision_models() -> list[str]:
    torchvision = pytest.importorskip("torchvision")
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build(name: str):
    if name in ("bert", "vit-hf"):
        transformers = pytest.importorskip("transformers")
        if name == "bert":
            config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=500)
            return transformers.BertModel(config).eval(), (torch.randint(0, 500, (1, 16)),)
        config = transformers.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
        return transformers.ViTForImageClassification(config).eval(), (torch.randn(1, 3, 32, 32),)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 299 if "inception" in name else 224 if any(k in name for k in ("vit", "swin", "maxvit")) else 64
    return model, (torch.randn(1, 3, size, size),)


def _prune_and_check(name: str, tmp_path) -> dict:
    model, inputs = _build(name)
    recipe = prune_preset()
    result = fxcompress.compile(model, inputs, recipe=recipe)
    stats = next(r.stats for r in result.report.records if r.name == "prune-channels")
    result.export_onnx(tmp_path / f"{name}.onnx", tolerance=1e-3)  # raises on an ORT parity failure
    assert result.report.parity.passed
    shrank = stats.get("macs_after", 1) < stats.get("macs_before", 0)
    assert shrank or stats["skipped"], f"{name}: neither shrank nor said why"
    for skipped in stats["skipped"]:
        assert skipped["reason"], skipped
    return {"shrank": shrank, "skipped": len(stats["skipped"])}


@pytest.mark.parametrize("name", CI_MODELS + ["bert"])
def test_prune_ci_subset(name, tmp_path):
    assert _prune_and_check(name, tmp_path)["shrank"]


def _torch_pruning_shrinks(name: str) -> bool:
    tp = pytest.importorskip("torch_pruning")
    model, inputs = _build(name)
    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    try:
        before = tp.utils.count_ops_and_params(model, inputs)[0]
        pruner = tp.pruner.MagnitudePruner(model, example_inputs=inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=0.5, ignored_layers=last)
        pruner.step()
        with torch.no_grad():
            model(*inputs)
        return tp.utils.count_ops_and_params(model, inputs)[0] < before
    except Exception:  # noqa: BLE001 - a peer failure counts as "did not shrink and run"
        return False


@pytest.mark.slow
def test_prune_every_torchvision_classifier_and_hf_configs(tmp_path):
    """Set FXCOMPRESS_SWEEP_LOG=path.jsonl to record one line per model and resume an interrupted sweep."""
    names = [n for n in _torchvision_models() if n not in TOO_BIG] + ["bert", "vit-hf"]
    done = sweep_log.read()
    ours, peer, failures = {}, {}, {}
    for name in names:
        if name in done:
            entry = done[name]
        else:
            entry = {"name": name, "ours": False, "peer": False, "error": None}
            start = time.perf_counter()
            try:
                entry["ours"] = _prune_and_check(name, tmp_path)["shrank"]
            except Exception as exc:  # noqa: BLE001 - collect all, report together
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            entry["peer"] = _torch_pruning_shrinks(name)
            entry["seconds"] = round(time.perf_counter() - start, 1)
            sweep_log.append(entry)
            (tmp_path / f"{name}.onnx").unlink(missing_ok=True)
        ours[name], peer[name] = entry["ours"], entry["peer"]
        if entry["error"]:
            failures[name] = entry["error"]
    ours_count = sum(ours.values())
    peer_count = sum(peer.values())
    print(f"shrank and run: fxcompress {ours_count}/{len(names)}, Torch-Pruning {peer_count}/{len(names)} "
          f"(not run, too big for this machine: {sorted(TOO_BIG)})")
    print("fxcompress only:", sorted(n for n in names if ours[n] and not peer[n]))
    print("Torch-Pruning only:", sorted(n for n in names if peer[n] and not ours[n]))
    print("neither:", sorted(n for n in names if not peer[n] and not ours[n]))
    assert not failures, failures
    assert ours_count >= peer_count
