"""The data users already have, as batches in the model's input form: calibration and evaluation.

    data = fxcompress.data.images("photos/", model=loaded)        # class subfolders -> labels
    data = fxcompress.data.text("prompts.txt", tokenizer=tok)       # padded batches + attention masks
    data = fxcompress.data.load("saved_dataset/", model=loaded)    # a datasets save_to_disk folder
    fxcompress.compile(model, data.example, "int8", calibration=data)

A :class:`Batches` is a list of model inputs (each what ``model(**batch)`` or ``model(batch)``
takes) plus, where the data has them, the labels of each batch: iterate it for calibration, and
read ``labels`` for accuracy. Preprocessing is the model's own (fxcompress.model_specs'
:class:`~fxcompress.model_specs.Preprocessor`: its image processor, timm's ``pretrained_cfg``,
its tokenizer); text is padded to one length so every batch fits a graph captured with static
shapes, and the attention mask says which positions are padding.

Sources: a folder of images (class subfolders give labels; a flat folder has none), a ``.txt``
file (one example per line) or ``.jsonl`` file (``text``, optional ``label``), a folder saved
with ``datasets``' ``save_to_disk`` (``image``/``img`` or ``text``/``sentence`` columns,
``label``/``labels``), and ``.pt`` / ``.npz`` tensors. Every problem (an unreadable image, an
empty file, labels asked for and missing) is an InputError naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fxcompress.errors import InputError, ModelFileError
from fxcompress.files import check_model_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
TEXT_COLUMNS = ("text", "sentence", "content", "prompt")
IMAGE_COLUMNS = ("image", "img", "picture")
LABEL_COLUMNS = ("label", "labels", "class")


@dataclass
class Batches:
    """Batches of model inputs from a data source, with their labels where the data has them.

    Iterating yields the batches (what ``calibration=`` takes); ``labels[i]`` is a LongTensor of
    class indices for batch ``i`` (the model's label ids), or ``labels`` is None.
    """

    batches: list[Any]
    labels: list[torch.Tensor] | None
    kind: str
    source: str
    #: class names of the label indices (folder names, or the model's id2label)
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def example(self) -> Any:
        """The first batch (example inputs of the right shapes)."""
        return self.batches[0]

    def require_labels(self) -> list[torch.Tensor]:
        """The labels, or an InputError saying how to give them."""
        if self.labels is None:
            hint = ("put the images in one subfolder per class (photos/cat/1.jpg, photos/dog/2.jpg)" if self.kind == "image"
                    else "give a JSON-lines file with a \"label\" field per line, or a dataset with a label column")
            raise InputError(f"{self.source} has no labels, so accuracy cannot be measured on it.", f"{hint}.")
        return self.labels

    def __repr__(self) -> str:
        labelled = f", {sum(len(x) for x in self.labels)} labels" if self.labels is not None else ""
        return f"Batches({len(self.batches)} {self.kind} batch(es) from {self.source}{labelled})"


def _preprocess(model: Any, preprocess: Any, tokenizer: Any = None, max_length: int | None = None) -> Any:
    """The Preprocessor given, else one over ``tokenizer`` (padding to ``max_length``), else ``model``'s."""
    found = preprocess if preprocess is not None else None
    if found is None and tokenizer is None:
        found = getattr(model, "preprocess", None)
    if found is None and tokenizer is not None:
        from fxcompress.model_specs import DEFAULT_MAX_LENGTH, Preprocessor

        length = max_length or min(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH,
                                   DEFAULT_MAX_LENGTH)

        def texts(batch: list[str]) -> dict[str, torch.Tensor]:
            return dict(tokenizer(list(batch), padding="max_length", truncation=True, max_length=length, return_tensors="pt"))

        found = Preprocessor("text", texts=texts, tokenizer=tokenizer, max_length=length)
    return found


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _check_size(batch_size: int, limit: int | None) -> None:
    if batch_size <= 0:
        raise InputError(f"batch size {batch_size} is not positive.", "give a batch size of at least 1.")
    if limit is not None and limit <= 0:
        raise InputError(f"size {limit} is not positive.", "give --calibration-size of at least 1.")


def _label_ids(names: Sequence[str], model_labels: Sequence[str] | None, where: str) -> tuple[dict[str, int], list[str], list[str]]:
    """Class index per label name: the model's own ids where every name is one of its labels
    (case-insensitive), integers as they are, else the sorted order (torchvision's ImageFolder)."""
    notes = []
    if model_labels:
        lower = {n.lower(): i for i, n in enumerate(model_labels)}
        if all(str(n).lower() in lower for n in names):
            return {n: lower[str(n).lower()] for n in names}, list(model_labels), notes
    if all(str(n).lstrip("-").isdigit() for n in names):
        return {n: int(n) for n in names}, [str(n) for n in sorted(names, key=int)], notes
    ordered = sorted(names)
    if model_labels:
        notes.append(f"the class names of {where} ({', '.join(ordered[:4])}) are not the model's labels "
                     f"({', '.join(model_labels[:4])}): classes are numbered in sorted order")
    return {n: i for i, n in enumerate(ordered)}, ordered, notes


def _open_image(path: Path) -> Any:
    from fxcompress.model_specs import require

    require("PIL", "Image data")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"Image {path} cannot be read ({type(exc).__name__}: {str(exc)[:120]}).",
                         "remove or replace the file (is it truncated, or not an image?).") from None


def _image_batches(images: list[Any], labels: list[int] | None, preprocess: Any, batch_size: int, source: str,
                   label_names: list[str] | None, notes: list[str], progress: bool) -> Batches:
    if preprocess is None or preprocess.images is None:
        raise InputError(f"{source} holds images, but the model has no image preprocessing to turn them into inputs.",
                         "use an hf:, timm: or torchvision: image model, or pass preprocess= / tensors (.pt, .npz).")
    batches, label_batches = [], []
    steps = list(_chunks(list(range(len(images))), batch_size))
    for chunk in _progress(steps, f"preprocessing {source}", progress):
        batches.append(preprocess.images([_load_lazy(images[i]) for i in chunk]))
        if labels is not None:
            label_batches.append(torch.tensor([labels[i] for i in chunk], dtype=torch.long))
    return Batches(batches, label_batches if labels is not None else None, "image", source, label_names, notes)


def _load_lazy(item: Any) -> Any:
    return _open_image(item) if isinstance(item, Path) else item.convert("RGB")


def _progress(items: Sequence[Any], what: str, enabled: bool) -> Any:
    if not enabled or len(items) < 8:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, leave=False)


def images(path: str | os.PathLike, model: Any = None, *, preprocess: Any = None, batch_size: int = 1,
           limit: int | None = None, progress: bool = False) -> Batches:
    """A folder of images: class subfolders (``photos/cat/1.jpg``) give labels, the model's own
    label ids where the folder names are its labels; a flat folder gives unlabelled batches.

    ``model``: a :class:`~fxcompress.model_specs.LoadedModel` (its preprocessing is used), or
    ``preprocess`` a Preprocessor. ``limit``: at most this many images (spread over the classes
    in order).
    """
    _check_size(batch_size, limit)
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"Image folder {folder} does not exist.", "check the path.")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise InputError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).",
                         "point at a folder of images, with one subfolder per class for labels.")
    nested = [p for p in found if p.parent != folder]
    labels = None
    label_names = None
    notes: list[str] = []
    pre = _preprocess(model, preprocess)
    if nested and len(nested) == len(found):
        classes = sorted({p.relative_to(folder).parts[0] for p in found})
        ids, label_names, notes = _label_ids(classes, getattr(pre, "labels", None), str(folder))
        if limit is not None and limit < len(found):  # round-robin over classes, so a small set sees each class
            by_class = {c: [p for p in found if p.relative_to(folder).parts[0] == c] for c in classes}
            found = _interleave(list(by_class.values()))[:limit]
        labels = [ids[p.relative_to(folder).parts[0]] for p in found]
    elif limit is not None:
        found = found[:limit]
    for file in found:  # read every file now: an unreadable one is named before any work starts
        _open_image(file)
    return _image_batches(list(found), labels, pre, batch_size, str(folder), label_names, notes, progress)


def _interleave(groups: list[list[Any]]) -> list[Any]:
    out = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _text_batches(lines: list[str], labels: list[Any] | None, preprocess: Any, batch_size: int, source: str,
                  progress: bool) -> Batches:
    if preprocess is None or preprocess.texts is None:
        raise InputError(f"{source} holds text, but the model has no tokenizer to turn it into inputs.",
                         "use an hf: model whose folder holds its tokenizer, or pass tokenizer=.")
    label_ids, label_names, notes = (None, None, [])
    if labels is not None:
        names = sorted({str(x) for x in labels})
        ids, label_names, notes = _label_ids(names, preprocess.labels, source)
        label_ids = [ids[str(x)] for x in labels]
    batches, label_batches = [], []
    for chunk in _progress(list(_chunks(list(range(len(lines))), batch_size)), f"tokenizing {source}", progress):
        batches.append(preprocess.texts([lines[i] for i in chunk]))
        if label_ids is not None:
            label_batches.append(torch.tensor([label_ids[i] for i in chunk], dtype=torch.long))
    return Batches(batches, label_batches if label_ids is not None else None, "text", source, label_names, notes)


def text(path: str | os.PathLike, tokenizer: Any = None, *, model: Any = None, preprocess: Any = None,
         batch_size: int = 1, limit: int | None = None, max_length: int | None = None, progress: bool = False) -> Batches:
    """A ``.txt`` file (one example per non-empty line) or ``.jsonl`` file (one JSON object per
    line with ``text`` and, optionally, ``label``), tokenized by the model's tokenizer (or
    ``tokenizer``, padding to ``max_length``: default 128 or its limit) into batches padded to one
    length, with attention masks."""
    _check_size(batch_size, limit)
    file = Path(path)
    if not file.is_file():
        raise InputError(f"Text file {file} does not exist.", "check the path.")
    try:
        raw = file.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{file} cannot be read as UTF-8 text ({type(exc).__name__}).", "give a UTF-8 text or JSON-lines file.") from None
    lines, labels = [], []
    if file.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"Line {number} of {file} is not JSON ({exc.msg}).", "write one JSON object per line.") from None
            value = next((record.get(c) for c in TEXT_COLUMNS if isinstance(record, dict) and isinstance(record.get(c), str)), None)
            if value is None:
                raise InputError(f"Line {number} of {file} has no text field ({', '.join(TEXT_COLUMNS)}).",
                                 'write lines like {"text": "...", "label": "positive"}.')
            lines.append(value)
            labels.append(next((record[c] for c in LABEL_COLUMNS if c in record), None))
    else:
        lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{file} holds no text.", "give a file with one example per line.")
    if limit is not None:
        lines, labels = lines[:limit], labels[:limit]
    if labels and any(x is None for x in labels):
        labels = []
    pre = _preprocess(model, preprocess, tokenizer, max_length)
    return _text_batches(lines, labels or None, pre, batch_size, str(file), progress)


def saved_dataset(path: str | os.PathLike, model: Any = None, *, preprocess: Any = None, tokenizer: Any = None,
                  batch_size: int = 1, limit: int | None = None, split: str | None = None, progress: bool = False) -> Batches:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict: ``split``,
    else validation, test or train): an image or text column, and a label column if present."""
    _check_size(batch_size, limit)
    from fxcompress.model_specs import require

    datasets = require("datasets", "A datasets folder")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - FileNotFoundError, a folder of another format
        raise InputError(f"{path} could not be opened with datasets.load_from_disk ({type(exc).__name__}: {str(exc)[:120]}).",
                         "save the dataset with dataset.save_to_disk(path).") from None
    if isinstance(data, datasets.DatasetDict):
        chosen = split or next((s for s in ("validation", "test", "train") if s in data), next(iter(data)))
        if chosen not in data:
            raise InputError(f"{path} has no split {chosen!r} (it has {', '.join(data)}).", "name one of its splits.")
        data = data[chosen]
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise InputError(f"The dataset in {path} is empty.", "save a dataset with at least one row.")
    columns = data.column_names
    label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
    labels = list(data[label_column]) if label_column else None
    feature = data.features.get(label_column) if label_column else None
    if labels is not None and hasattr(feature, "names"):
        labels = [feature.names[i] for i in labels]  # class names, mapped to the model's own ids below
    pre = _preprocess(model, preprocess, tokenizer)
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_column is not None:
        images_list = list(data[image_column])
        names = sorted({str(x) for x in labels}) if labels is not None else []
        ids, label_names, notes = _label_ids(names, getattr(pre, "labels", None), str(path)) if labels is not None else ({}, None, [])
        return _image_batches(images_list, [ids[str(x)] for x in labels] if labels is not None else None, pre, batch_size,
                              str(path), label_names, notes, progress)
    text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text_column is None:
        raise InputError(f"The dataset in {path} has no image or text column (it has {', '.join(columns)}).",
                         f"name the column one of {', '.join(IMAGE_COLUMNS + TEXT_COLUMNS)}, or save tensors as .pt.")
    return _text_batches(list(data[text_column]), labels, pre, batch_size, str(path), progress)


def tensors(path: str | os.PathLike, *, example: Any = None, limit: int | None = None) -> Batches:
    """Batches saved as tensors: a ``.pt`` list of tensors / tuples / dicts (loaded with
    ``weights_only``), or a ``.npz`` whose arrays are the inputs (by name when ``example`` is a
    dict, else in order), one batch per row of their first axis."""
    _check_size(1, limit)
    file = check_model_file(path, "Tensor file")
    if file.suffix == ".npz":
        import numpy as np

        try:
            with np.load(str(file), allow_pickle=False) as archive:
                arrays = {k: torch.from_numpy(archive[k]) for k in archive.files}
        except Exception as exc:  # noqa: BLE001 - corrupt zip, object arrays
            raise ModelFileError(f"{file} could not be read as a .npz of plain arrays ({type(exc).__name__}).",
                                 "save it with numpy.savez(path, name=array, ...).") from None
        if not arrays:
            raise InputError(f"{file} holds no arrays.", "save at least one input array.")
        count = min(len(a) for a in arrays.values())
        if isinstance(example, dict):
            missing = [k for k in example if k not in arrays]
            if missing:
                raise InputError(f"{file} has no array for the input(s) {missing} (it has {', '.join(arrays)}).",
                                 "save one array per model input, named as the input.")
            batches = [{k: arrays[k][i:i + 1] for k in example} for i in range(count)]
        else:
            batches = [tuple(a[i:i + 1] for a in arrays.values()) for i in range(count)]
    else:
        try:
            data = torch.load(str(file), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"Calibration file {file} could not be loaded safely ({type(exc).__name__}: {str(exc)[:160]}).",
                                 "save a list of tensors or of tuples of tensors with torch.save.") from None
        if isinstance(data, torch.Tensor):
            data = list(data.split(1))
        batches = [item if isinstance(item, (tuple, list, dict)) else (item,) for item in data]
    if not batches:
        raise InputError(f"{file} holds no batches.", "save at least one input batch.")
    return Batches(batches[:limit] if limit else batches, None, "tensors", str(file))


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by datasets' ``save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load(spec: str | os.PathLike, model: Any = None, *, preprocess: Any = None, tokenizer: Any = None, batch_size: int = 1,
         limit: int | None = None, progress: bool = False) -> Batches:
    """Any data source by its path: a ``datasets`` folder, an image folder, a ``.txt`` / ``.jsonl``
    file, or ``.pt`` / ``.npz`` tensors."""
    path = Path(spec)
    if not path.exists():
        raise InputError(f"Data {path} does not exist.", "give an image folder, a .txt/.jsonl file, a datasets folder, or .pt/.npz tensors.")
    if is_saved_dataset(path):
        return saved_dataset(path, model, preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size, limit=limit,
                             progress=progress)
    if path.is_dir():
        return images(path, model, preprocess=preprocess, batch_size=batch_size, limit=limit, progress=progress)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl", ".json", ".text"):
        return text(path, tokenizer, model=model, preprocess=preprocess, batch_size=batch_size, limit=limit, progress=progress)
    if suffix in (".pt", ".pth", ".npz"):
        return tensors(path, example=getattr(model, "example_inputs", None), limit=limit)
    raise InputError(f"Cannot tell what data {path} holds (suffix {suffix or 'none'}).",
                     "give an image folder, a .txt/.jsonl file, a datasets save_to_disk folder, or .pt/.npz tensors.")


__all__ = ["Batches", "images", "load", "saved_dataset", "tensors", "text"]
