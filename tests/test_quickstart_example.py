"""The README's quick-start session runs on what fxcompress.examples.quickstart builds: check it builds that."""

from __future__ import annotations

import json

import pytest


def test_quickstart_builds_a_hub_cache_model_and_image_folders(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    import huggingface_hub.constants

    from fxcompress.examples import quickstart
    from fxcompress.model_specs import load_model_spec

    quickstart.main([str(tmp_path), "--epochs", "1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model"] == "hf:acme/resnet-digits"
    train, val = sorted(p.name for p in (tmp_path / "digits" / "train").iterdir()), (tmp_path / "digits" / "val")
    assert train == [str(d) for d in range(10)]
    assert sum(1 for _ in (tmp_path / "digits" / "train").glob("*/*.png")) == 1400
    assert sum(1 for _ in val.glob("*/*.png")) == 397

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model_spec("hf:acme/resnet-digits")
    assert loaded.task == "image-classification"
    assert tuple(loaded.example_inputs["pixel_values"].shape) == (1, 3, 32, 32)
    assert loaded.model(**loaded.example_inputs).logits.shape == (1, 10)
