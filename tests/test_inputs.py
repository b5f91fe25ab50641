"""Inputs as users pass them: keyword dicts (a tokenizer's BatchEncoding), (args, kwargs), nested
lists; structured outputs; ONNX names; calibration in the same form; and the bad-input errors."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import fxcompress
from tests.models import KeywordModel


class ImageList(nn.Module):
    """Takes a list of images (torchvision detection style) and a scale, returns a nested tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images, scale):
        features = [self.conv(image.unsqueeze(0)) * scale for image in images]
        return features[0], (features[1].mean(), features[1])


def _batch(seed: int = 0, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_keyword_inputs_compile_export_and_call_like_the_model(tmp_path):
    model = KeywordModel().eval()
    batch = _batch()
    result = fxcompress.compile(model, batch, "default")
    out = result.module(**batch)
    assert set(out) == {"last_hidden_state", "pooled"}
    torch.testing.assert_close(out["pooled"], model(**batch)["pooled"])
    path = result.export_onnx(tmp_path / "kw.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state", "pooled"]
    assert fxcompress.validate(path, model, batch).passed
    assert fxcompress.benchmark(path, batch, runs=3, warmup=1).p50_ms > 0


def test_args_kwargs_pair_and_batch_encoding():
    transformers = pytest.importorskip("transformers")
    model = KeywordModel().eval()
    batch = _batch()
    encoding = transformers.BatchEncoding(batch)
    by_pair = fxcompress.compile(model, ((batch["input_ids"],), {"attention_mask": batch["attention_mask"]}), "default")
    by_encoding = fxcompress.compile(model, encoding, "default")
    torch.testing.assert_close(by_pair.module(batch["input_ids"], attention_mask=batch["attention_mask"])["pooled"],
                               by_encoding.module(**encoding)["pooled"])


def test_nested_list_inputs_and_nested_outputs(tmp_path):
    model = ImageList().eval()
    images = [torch.randn(3, 8, 8), torch.randn(3, 8, 8)]
    scale = torch.tensor(2.0)
    result = fxcompress.compile(model, (images, scale), "default")
    first, (mean, second) = result.module(images, scale)
    torch.testing.assert_close(second, model(images, scale)[1][1])
    proto = onnx.load(str(result.export_onnx(tmp_path / "list.onnx")))
    assert [i.name for i in proto.graph.input] == ["images_0", "images_1", "scale"]


def test_calibration_batches_in_the_keyword_form():
    model = KeywordModel().eval()
    calibration = [_batch(seed) for seed in range(4)]
    result = fxcompress.compile(model, _batch(), "int8-dynamic", calibration=calibration)
    assert result.report.drift < 0.05
    with pytest.raises(fxcompress.InputError, match="structured differently"):
        fxcompress.compile(model, _batch(), "int8", calibration=[{"input_ids": _batch()["input_ids"]}], tolerance=1.0)


def test_compile_tolerance_governs_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 16)
    result = fxcompress.compile(model, (x,), "int8-dynamic", tolerance=0.5)
    assert result.tolerance == 0.5 and result._export_tolerance() == 0.5
    assert result.export_onnx(tmp_path / "m.onnx").exists()


def _user_model_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("inputs, fragment", [
    ({"input_ids": torch.zeros(2, 6, dtype=torch.long), "token_mask": torch.ones(2, 6)}, "does not take"),
    ({"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": [torch.ones(2, 6), "x"]}, "is of type str"),
    ({"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.zeros(2, 6)}, "NaN or inf"),
], ids=["unknown-key", "ragged", "nan-outputs"])
def test_bad_inputs_are_one_clear_error(inputs, fragment, tmp_path):
    model = KeywordModel().eval()
    before = _user_model_state(model)
    with pytest.raises(fxcompress.InputError, match=fragment) as info:
        fxcompress.compile(model, inputs, "default")
    if fragment == "does not take":
        assert "['input_ids', 'attention_mask']" in str(info.value)  # forward()'s parameters listed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), "0.1"])
def test_negative_or_nan_tolerance_is_refused_before_any_work(tolerance):
    with pytest.raises(fxcompress.InputError, match="tolerance must be a number >= 0"):
        fxcompress.compile(KeywordModel().eval(), _batch(), "default", tolerance=tolerance)


class DataDependent(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        if attention_mask.sum() > 3:  # a decision on the values: torch.export cannot capture it
            return input_ids * 2
        return input_ids


def test_capture_error_names_the_models_own_line_with_keyword_inputs():
    with pytest.raises(fxcompress.CaptureError, match=r"test_inputs\.py:\d+ in forward: `if attention_mask\.sum\(\) > 3:"):
        fxcompress.compile(DataDependent(), _batch(), "default")


def test_dynamic_sequence_one_onnx_file_for_every_length(tmp_path):
    model = KeywordModel().eval()
    result = fxcompress.compile(model, _batch(), "default",
                                options=fxcompress.CompileOptions(dynamic_batch=True, dynamic_sequence=True))
    path = result.export_onnx(tmp_path / "m.onnx")  # parity also checked at a second, longer length
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input]
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims), dims
    longer = _batch(seed=3, length=11)
    longer["input_ids"] = torch.cat([longer["input_ids"], longer["input_ids"][:1]])  # batch 3 too
    longer["attention_mask"] = torch.cat([longer["attention_mask"], longer["attention_mask"][:1]])
    assert fxcompress.validate(path, model, longer).passed
    torch.testing.assert_close(result.module(**longer)["pooled"], model(**longer)["pooled"])


def test_bert_with_dynamic_sequence_exports_once_for_every_length(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50)
    model = transformers.BertModel(config).eval()
    result = fxcompress.compile(model, _batch(length=8), "int8-dynamic",
                                options=fxcompress.CompileOptions(dynamic_batch=True, dynamic_sequence=True))
    path = result.export_onnx(tmp_path / "bert.onnx")
    report = fxcompress.validate(path, model, _batch(seed=5, length=13), tolerance=result.tolerance)
    assert report.passed, report.to_text()
