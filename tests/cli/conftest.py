"""Models and data as users have them, built once per test session (tests/frontdoor_models.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def frontdoor(tmp_path_factory) -> SimpleNamespace:
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    from tests import frontdoor_models as build

    root: Path = tmp_path_factory.mktemp("frontdoor")
    images = build.image_folder(root / "images")
    return SimpleNamespace(
        root=root,
        bert=build.bert_classifier(root / "bert"),
        encoder=build.bert_encoder(root / "encoder"),
        vit=build.vit_classifier(root / "vit"),
        llama=build.llama(root / "llama"),
        timm_weights=build.timm_checkpoint(root / "test_resnet.safetensors"),
        images=images,
        text=build.text_file(root / "prompts.txt"),
        jsonl=build.jsonl_file(root / "labelled.jsonl"),
        text_dataset=build.saved_dataset(root / "text_dataset"),
        image_dataset=build.saved_dataset(root / "image_dataset", images),
    )
