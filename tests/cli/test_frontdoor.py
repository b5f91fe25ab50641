"""The front door: hf:/timm: models and the user's data through ``fxcompress compile`` into a
deployable folder, the task metric, decoders and ``generate``, and the bad cases as one-paragraph
errors (exit status 2, nothing written). Everything is built locally (tests/frontdoor_models.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from fxcompress.cli import main

FAST = ["--no-baseline", "--runs", "4"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _one_paragraph(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0], err
    return lines[0]


def test_hf_image_classifier_int8_on_an_image_folder_writes_a_deployable_folder(frontdoor, tmp_path, capsys):
    out = tmp_path / "vit-int8"
    code = main(["compile", f"hf:{frontdoor.vit}", "--recipe", "int8", "--calibration", str(frontdoor.images),
                 "--calibration-size", "4", "--eval", str(frontdoor.images), "--max-accuracy-drop", "0",
                 "--out", f"{out}/", *FAST])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "metric_trials" in text  # --max-accuracy-drop ran compile's accuracy-aware search on the top-1
    assert "Task metric on" in text and "top-1 accuracy" in text and "original (PyTorch)" in text
    assert "calibration_batches=4" in text  # --calibration-size kept 4 of the 6 images
    assert _files(out) == {"model.onnx", "preprocessor_config.json", "config.json", "manifest.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == "int8" and manifest["task"] == "image-classification"
    assert "quantize-int8" in manifest["passes"] and manifest["labels"] == ["red", "blue"]
    assert manifest["metric"]["name"] == "top1" and manifest["metric"]["examples"] == 6
    assert manifest["graphs"]["model"]["inputs"] == ["pixel_values"] and manifest["graphs"]["model"]["outputs"] == ["logits"]
    assert manifest["compile"]["metric"]["max_drop"] == 0 and manifest["compile"]["metric"]["drop"] <= 0
    assert manifest["parity"]["passed"] and torch.__version__.startswith(manifest["versions"]["torch"])
    assert (out / "model.onnx").stat().st_mode & 0o777 == 0o666 & ~_umask()

    # What a deployment does with the folder alone: the saved processor, then ONNX Runtime.
    import onnxruntime as ort
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    image = Image.open(next((frontdoor.images / "red").iterdir()))
    pixels = AutoImageProcessor.from_pretrained(out)(images=[image.convert("RGB")], return_tensors="np")["pixel_values"]
    logits = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]
    with torch.no_grad():
        expected = ViTForImageClassification.from_pretrained(frontdoor.vit)(pixel_values=torch.from_numpy(pixels)).logits
    # within the int8 preset's own bound (relative RMS error 0.4; the logits of this random ViT are
    # about 0.1, so int8's rounding is some percent of them), with the same class
    assert np.linalg.norm(logits - expected.numpy()) <= 0.4 * np.linalg.norm(expected.numpy())
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()

    assert main(["inspect", str(out), "--no-providers"]) == 0
    shown = capsys.readouterr().out
    assert "fxcompress output folder" in shown and "recipe: int8" in shown and "top1" in shown
    assert "QuantizeLinear" in shown or "DequantizeLinear" in shown  # then the file's own op table


def test_long_steps_show_progress_when_a_person_watches(frontdoor, tmp_path, capsys, monkeypatch):
    """On a terminal: bars for preprocessing, the passes, calibration, export and parity, timing
    and evaluation (stderr); none when stderr is not a terminal (the other tests)."""
    import fxcompress.cli.compile_command as command

    from tests.frontdoor_models import image_folder

    images = image_folder(tmp_path / "images", per_class=5)  # 10: short lists (under 8) get no bar
    monkeypatch.setattr(command, "_progress", lambda: True)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main(["compile", f"hf:{frontdoor.vit}", "--recipe", "int8", "--calibration", str(images),
                 "--eval", str(images), "--out", str(tmp_path / "m.onnx"), *FAST]) == 0
    err = capsys.readouterr().err
    for step in ("preprocessing", "compiling", "calibrating", "exporting ONNX and checking parity", "timing and checking",
                 "evaluating the original", "evaluating m.onnx"):
        assert step in err, step


def test_hf_text_classifier_calibrates_on_text_and_measures_labelled_jsonl(frontdoor, tmp_path, capsys):
    out = tmp_path / "bert"
    code = main(["compile", f"hf:{frontdoor.bert}", "--recipe", "int8-dynamic", "--calibration", str(frontdoor.text),
                 "--eval", str(frontdoor.jsonl), "--max-length", "24", "--out", f"{out}/", *FAST])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "int64[1, 24]" in text  # padded to --max-length
    assert {"model.onnx", "tokenizer.json", "config.json", "manifest.json"} <= _files(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metric"]["values"]["original"]["examples"] == 6
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)  # the folder alone is enough to tokenize
    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert tokenizer("def f(): pass")["input_ids"][0] == tokenizer.cls_token_id


def test_encoder_cosine_on_a_saved_datasets_folder(frontdoor, tmp_path, capsys):
    out = tmp_path / "encoder"
    assert main(["compile", f"hf:{frontdoor.encoder}", "--eval", str(frontdoor.text_dataset), "--max-length", "16",
                 "--out", f"{out}/", *FAST]) == 0
    text = capsys.readouterr().out
    assert "embedding cosine vs the original" in text
    values = json.loads((out / "manifest.json").read_text())["metric"]["values"]
    assert values["original"]["value"] == pytest.approx(1.0)
    assert values["compiled"]["value"] > 0.9999  # default is lossless


def test_timm_checkpoint_with_its_pretrained_cfg_preprocessing(frontdoor, tmp_path, capsys):
    out = tmp_path / "timm"
    code = main(["compile", "timm:test_resnet", "--weights", str(frontdoor.timm_weights), "--num-classes", "2",
                 "--calibration", str(frontdoor.image_dataset), "--eval", str(frontdoor.image_dataset),
                 "--out", f"{out}/", *FAST])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "float32[1, 3, 160, 160]" in text  # test_resnet's pretrained_cfg input size
    preprocessing = json.loads((out / "preprocessing.json").read_text())
    assert preprocessing["input_size"] == [3, 160, 160] and preprocessing["mean"] == [0.5, 0.5, 0.5]
    import onnxruntime as ort
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("test_resnet", num_classes=2).eval()
    model.load_state_dict(load_file(str(frontdoor.timm_weights)))
    x = torch.randn(1, 3, 160, 160)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(got, model(x).detach().numpy(), atol=1e-4)  # the checkpoint's weights, not random ones


def test_causal_lm_folder_and_generate(frontdoor, tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["compile", f"hf:{frontdoor.llama}", "--out", f"{out}/"]) == 0
    capsys.readouterr()
    assert {"model.onnx", "tokenizer.json", "config.json", "manifest.json"} <= _files(out)
    assert main(["generate", str(out), "--prompt", "The import statement", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("the import statement") and len(printed[0]) > len("the import statement")
    # greedy in ONNX Runtime continues the prompt exactly as transformers does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The import statement", return_tensors="pt")["input_ids"]
    expected = AutoModelForCausalLM.from_pretrained(frontdoor.llama).generate(ids, max_new_tokens=6, do_sample=False,
                                                                             eos_token_id=None)
    assert printed[0] == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_decoder_folder_loads_in_onnxruntime_genai(frontdoor, tmp_path, capsys):
    """The folder's genai_config.json: onnxruntime-genai's og.Model(DIR) loads the graph and its
    greedy continuation is fxcompress generate's (token for token)."""
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    out = tmp_path / "lm"
    assert main(["compile", f"hf:{frontdoor.llama}", "--out", f"{out}/"]) == 0
    capsys.readouterr()
    assert "genai_config.json" in json.loads((out / "manifest.json").read_text())["files"]
    assert main(["generate", str(out), "--prompt", "The import statement", "--max-new-tokens", "6"]) == 0
    ours = capsys.readouterr().out.strip()

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The import statement")["input_ids"]
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    sequence = [int(t) for t in generator.get_sequence(0)]
    assert len(sequence) == len(ids) + 6 and sequence[:len(ids)] == ids
    assert tokenizer.decode(sequence, skip_special_tokens=True) == ours


@pytest.mark.slow
def test_causal_lm_int4_with_calibration_text_and_perplexity(frontdoor, tmp_path, capsys):
    out = tmp_path / "lm"
    code = main(["compile", f"hf:{frontdoor.llama}", "--recipe", "int4-weights", "--calibration", str(frontdoor.text),
                 "--eval", str(frontdoor.text), "--out", f"{out}/"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "perplexity" in text
    assert {"model.onnx", "model.prefill.onnx", "tokenizer.json", "config.json", "manifest.json"} <= _files(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "causal-lm" and manifest["decoder"] == {"prefill": "int8-dynamic", "decode": "int4-weights"}
    values = manifest["metric"]["values"]
    assert values["compiled"]["value"] == pytest.approx(values["original"]["value"], rel=0.05)

    assert main(["generate", str(out), "--prompt", "The import statement", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("the import statement") and len(printed[0]) > len("the import statement")
    assert main(["generate", str(out), "--prompt", "a", "--prompt", "class", "--do-sample", "--seed", "3",
                 "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_causal_lm_accuracy_budget_searches_on_the_perplexity(frontdoor, tmp_path, capsys):
    """--max-accuracy-drop on a causal LM: compile_decoder's search scored by the relative rise of
    the perplexity of --eval (lower is better), on the decode graph and on its prefill graph."""
    out = tmp_path / "lm"
    code = main(["compile", f"hf:{frontdoor.llama}", "--recipe", "int8-dynamic", "--calibration", str(frontdoor.text),
                 "--calibration-size", "4", "--eval", str(frontdoor.text), "--eval-size", "8",
                 "--max-accuracy-drop", "0", "--out", f"{out}/"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "metric_trials" in text and "perplexity" in text
    manifest = json.loads((out / "manifest.json").read_text())
    searched = manifest["compile"]["metric"]
    assert searched["max_drop"] == 0 and searched["drop"] <= 0  # the perplexity did not rise
    values = manifest["metric"]["values"]
    # the budget is kept by the compiled module; ORT's int8 kernels round a little differently (parity bounds that)
    assert values["compiled"]["value"] == pytest.approx(values["original"]["value"], rel=0.02)
    assert main(["generate", str(out), "--prompt", "The import statement", "--max-new-tokens", "3"]) == 0


def test_causal_lm_needs_a_folder_and_generate_needs_a_decoder(frontdoor, tmp_path, capsys):
    assert main(["compile", f"hf:{frontdoor.llama}", "--out", str(tmp_path / "lm.onnx")]) == 2
    assert "--out DIR/" in _one_paragraph(capsys.readouterr().err)
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest.json" in _one_paragraph(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# bad cases: one paragraph, exit status 2, nothing written

def _bad(tmp_path, frontdoor):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(frontdoor.images, corrupt)
    (corrupt / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((frontdoor.images / "red").iterdir()), flat / "one.png")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(frontdoor.bert / name, no_tokenizer / name)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    return {
        "unknown hub id": (["hf:nobody/no-such-model"], "in the local Hugging Face cache (looked in"),
        "folder without a tokenizer": ([f"hf:{no_tokenizer}"], "has no tokenizer"),
        "labels missing": ([f"hf:{frontdoor.vit}", "--eval", str(flat)], "has no labels"),
        "unreadable image": ([f"hf:{frontdoor.vit}", "--calibration", str(corrupt)], "broken.png cannot be read"),
        "empty text file": ([f"hf:{frontdoor.bert}", "--calibration", str(empty)], "holds no text"),
        "weights that do not fit": (["timm:test_resnet", "--weights", str(frontdoor.timm_weights)], "do not fit timm:test_resnet"),
        "accuracy budget without data": ([f"hf:{frontdoor.vit}", "--max-accuracy-drop", "0.01"], "without --eval"),
    }


@pytest.mark.parametrize("case", ["unknown hub id", "folder without a tokenizer", "labels missing", "unreadable image",
                                  "empty text file", "weights that do not fit", "accuracy budget without data"])
def test_bad_input_is_one_paragraph_and_writes_nothing(case, frontdoor, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    spec, expected = _bad(tmp_path, frontdoor)[case]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    assert main(["compile", *spec, "--out", f"{outputs}/model/", *FAST]) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert expected in line
    if case == "unknown hub id":
        assert str(tmp_path / "hub-cache" / "models--nobody--no-such-model") in line
    assert list(outputs.iterdir()) == []


def test_hub_id_resolves_from_the_local_cache_offline(frontdoor, tmp_path, monkeypatch, capsys):
    """A hub id is read from the Hugging Face cache layout (models--org--name/snapshots/REV), never downloaded."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--local--tiny-bert" / "snapshots" / "0123abcd"
    shutil.copytree(frontdoor.bert, snapshot)
    (cache / "models--local--tiny-bert" / "refs").mkdir()
    (cache / "models--local--tiny-bert" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fxcompress.model_specs import load_model_spec

    loaded = load_model_spec("hf:local/tiny-bert", max_length=12)
    assert loaded.source == str(snapshot) and loaded.task == "text-classification"
    assert set(loaded.example_inputs) == {"input_ids", "attention_mask"} and loaded.example_inputs["input_ids"].shape == (1, 12)
    assert loaded.preprocess.labels == ["red", "blue"]


def test_torchvision_weights_file_and_num_classes(tmp_path):
    from fxcompress.errors import InputError
    from fxcompress.model_specs import load_model_spec
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    loaded = load_model_spec("torchvision:mobilenet_v3_small", weights=str(tmp_path / "w.pt"), num_classes=5)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference(x))
    assert tuple(loaded.example_inputs.shape) == (1, 3, 224, 224)
    with pytest.raises(InputError, match="do not fit"):  # the default 1000-class head
        load_model_spec("torchvision:mobilenet_v3_small", weights=str(tmp_path / "w.pt"))
    saved = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    try:
        with pytest.raises(InputError, match="torch's cache"):  # nothing is downloaded
            load_model_spec("torchvision:mobilenet_v3_small", weights="pretrained")
    finally:
        torch.hub.set_dir(saved)


def test_missing_library_names_the_pip_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(["compile", "timm:resnet18", "--out", f"{tmp_path}/m/"]) == 2
    assert "pip install timm" in _one_paragraph(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# the same as a Python API

def test_data_api_images_text_and_tensors(frontdoor, tmp_path):
    from fxcompress import data
    from fxcompress.model_specs import load_model_spec

    vit = load_model_spec(f"hf:{frontdoor.vit}")
    images = data.images(frontdoor.images, model=vit, batch_size=4)
    assert [b["pixel_values"].shape[0] for b in images] == [4, 2]
    # folder names are the model's own labels (id2label: 0 red, 1 blue), not the sorted order
    assert torch.cat(images.require_labels()).tolist() == [1, 1, 1, 0, 0, 0]
    limited = data.images(frontdoor.images, model=vit, limit=2)
    assert torch.cat(limited.labels).tolist() == [1, 0]  # a small subset sees every class

    bert = load_model_spec(f"hf:{frontdoor.bert}", max_length=20)
    texts = data.text(frontdoor.jsonl, tokenizer=bert.preprocess.tokenizer, batch_size=3, max_length=20)
    batch = texts.example
    assert batch["input_ids"].shape == (3, 20) and batch["attention_mask"].shape == (3, 20)
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\nimport os\n")
    padded = data.text(short, model=bert).example
    assert padded["input_ids"].shape == (1, 20) and 0 < int(padded["attention_mask"].sum()) < 20  # the mask marks padding
    # label names red/blue are the model's own labels (without the model, they number in sorted order)
    assert texts.labels is not None and torch.cat(texts.labels).tolist() == [1, 0, 1, 0, 1, 0]
    assert torch.cat(data.text(frontdoor.jsonl, model=bert).labels).tolist() == [0, 1, 0, 1, 0, 1]
    assert data.text(frontdoor.text, model=bert).labels is None

    np.savez(tmp_path / "x.npz", input_ids=np.ones((3, 20), np.int64), attention_mask=np.ones((3, 20), np.int64))
    arrays = data.load(tmp_path / "x.npz", bert)
    assert len(arrays) == 3 and set(arrays.example) == {"input_ids", "attention_mask"}
    with pytest.raises(Exception, match="has no labels"):
        data.text(frontdoor.text, model=bert).require_labels()


def test_compile_on_a_causal_lm_points_at_compile_decoder(frontdoor):
    import fxcompress
    from fxcompress.errors import CaptureError
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(frontdoor.llama)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(CaptureError, match="compile_decoder") as caught:
        fxcompress.compile(model, {"input_ids": ids})
    assert "pytree" not in str(caught.value)
    model.config.use_cache = False  # the logits-only graph, as the message says
    result = fxcompress.compile(model, {"input_ids": ids})
    assert result.report.drift < 1e-4


def test_hf_task_override_weights_file_and_timm_pretrained_offline(frontdoor, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import save_file
    from transformers import BertForSequenceClassification

    from fxcompress.errors import InputError
    from fxcompress.model_specs import load_model_spec

    encoder = load_model_spec(f"hf:{frontdoor.bert}", task="feature-extraction", max_length=8)
    assert type(encoder.model).__name__ == "BertModel" and encoder.task == "feature-extraction"
    with pytest.raises(InputError, match="Unknown --task"):
        load_model_spec(f"hf:{frontdoor.bert}", task="translation")

    reference = BertForSequenceClassification.from_pretrained(frontdoor.bert).eval()
    torch.manual_seed(5)
    for p in reference.parameters():  # weights that differ from the folder's
        p.data.add_(torch.randn_like(p) * 0.1)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    tuned = load_model_spec(f"hf:{frontdoor.bert}", weights=str(tmp_path / "tuned.safetensors"), max_length=8)
    with torch.no_grad():
        assert torch.allclose(tuned.model(**tuned.example_inputs).logits, reference(**tuned.example_inputs).logits)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError, match=r"timm/test_resnet.r160_in1k.*not in the Hugging Face cache at .*empty-cache"):
        load_model_spec("timm:test_resnet", weights="pretrained")
