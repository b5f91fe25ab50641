"""Models users already have, named on the command line: ``hf:ID_OR_FOLDER``, ``timm:NAME``,
``torchvision:NAME``, each with optional weights and a number of classes.

    loaded = load_model_spec("hf:./my-bert")            # a save_pretrained folder
    loaded = load_model_spec("hf:org/name")              # a hub id, from the local cache (offline)
    loaded = load_model_spec("timm:resnet18", weights="pretrained", num_classes=10)
    loaded.model, loaded.example_inputs, loaded.preprocess.images([pil_image])

Each spec comes with its :class:`Preprocessor`: the model's own tokenizer, image processor or
normalization (timm's ``pretrained_cfg``, torchvision's weight transforms), which makes the
example inputs (in keyword form for transformers models: ``input_ids``, ``attention_mask``;
``pixel_values``) and turns user data into batches (fxcompress.data). Nothing is downloaded:
hub ids resolve from the local Hugging Face cache with the libraries' own loaders, and a model
that is not there is an InputError naming the cache folder that was searched. Weight files are
loaded with ``weights_only`` (safetensors, or a state dict), never by unpickling code.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fxcompress.errors import InputError, ModelFileError

#: Input sizes of torchvision classifiers whose default is not 224.
TORCHVISION_SIZES = {"inception_v3": 299}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: ``--task`` names and the transformers Auto class each loads with.
HF_TASKS = {
    "text-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
}
#: Text inputs are padded to this many tokens unless ``max_length`` says otherwise.
DEFAULT_MAX_LENGTH = 128
#: Files of which a folder must hold one to have a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
EXAMPLE_TEXT = "An example sentence to trace the model with."


@dataclass
class Preprocessor:
    """How raw data becomes the model's inputs, and which files a deployment needs for it.

    ``kind`` is "image" or "text" (None: tensors only). ``images(list of PIL images)`` and
    ``texts(list of str)`` return one batch in the model's input form (a tensor, or a dict of
    keyword tensors). ``labels`` are the class names by index (the model's ``id2label``), if
    known. ``save(folder)`` writes the tokenizer / image processor / config files a runtime needs.
    """

    kind: str | None
    images: Callable[[list[Any]], Any] | None = None
    texts: Callable[[list[str]], Any] | None = None
    labels: list[str] | None = None
    tokenizer: Any = None
    save: Callable[[Path], list[str]] | None = None
    max_length: int | None = None
    #: plain data describing the preprocessing (size, mean, std), stored in the manifest
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A model and the example inputs to capture it with (a tuple of tensors, or the keyword /
    nested form a factory returned, e.g. a tokenizer's dict).

    ``task``: "image-classification", "text-classification", "causal-lm", "feature-extraction"
    (None: unknown). ``preprocess``: the model's own preprocessing (None for specs without one).
    """

    model: nn.Module
    example_inputs: Any
    description: str
    task: str | None = None
    preprocess: Preprocessor | None = None
    #: where the model came from (a folder for hf:), for the manifest
    source: str | None = None


def require(module: str, spec_kind: str) -> Any:
    """Import ``module`` or raise an InputError naming the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"PIL": "pillow"}.get(module, module)
        raise InputError(f"{spec_kind} needs the {package} package, which is not installed.",
                         f"pip install {package} (or pip install 'fxcompress[hf]' for every model and data spec).") from None


# ---------------------------------------------------------------------------------------------
# weights

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch-saved dict, loaded with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Weights file {path} does not exist.", "check the path given to --weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - pickle refusal, corrupt zip, bad header
        raise ModelFileError(f"Weights file {path} could not be loaded as plain tensors ({type(exc).__name__}: {str(exc)[:160]}).",
                             "save the weights with safetensors or torch.save(model.state_dict(), path).") from None
    for key in ("state_dict", "model", "model_state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"Weights file {path} does not hold a state dict (names -> tensors).",
                             "save it with torch.save(model.state_dict(), path) or safetensors.")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, spec: str) -> None:
    """Load the weights file ``path`` into ``model``; InputError naming what does not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        detail = "; ".join(part for part in (
            f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
            f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"not in the model: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "",
        ) if part)
        raise InputError(f"The weights in {path} do not fit {spec} ({detail}).",
                         "give the architecture the checkpoint was saved from, and --num-classes matching its head.")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# image preprocessing shared by timm and torchvision

def _example_image(size: tuple[int, int]) -> Any:
    """A deterministic RGB test card (PIL) of ``size`` (width, height) to make example inputs with."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def _transform_preprocessor(transform: Callable[[Any], torch.Tensor], summary: dict[str, Any],
                            labels: list[str] | None) -> Preprocessor:
    def images(batch: list[Any]) -> torch.Tensor:
        return torch.stack([transform(image.convert("RGB")) for image in batch])

    def save(folder: Path) -> list[str]:
        from fxcompress.export.atomic import write_atomically

        text = json.dumps({**summary, "labels": labels}, indent=2) + "\n"
        write_atomically(folder / "preprocessing.json", lambda tmp: tmp.write_text(text))
        return ["preprocessing.json"]

    return Preprocessor("image", images=images, labels=labels, save=save, summary=summary)


def _image_transform(size: int, resize: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear"):
    transforms = require("torchvision.transforms", "Image preprocessing")
    mode = getattr(transforms.InterpolationMode, interpolation.upper(), transforms.InterpolationMode.BILINEAR)
    return transforms.Compose([transforms.Resize(resize, interpolation=mode), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def _image_inputs(preprocess: Preprocessor, shapes) -> Any:
    if shapes:
        return tuple(torch.randn(s) for s in shapes)
    size = preprocess.summary.get("input_size", (3, 224, 224))
    return preprocess.images([_example_image((size[2], size[1]))])


# ---------------------------------------------------------------------------------------------
# torchvision

def load_torchvision(name: str, shapes=None, *, weights: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """``torchvision:NAME``: random weights, ``weights="pretrained"`` (from torch's hub cache,
    offline) or a weights file; ``num_classes`` replaces the head."""
    torchvision = require("torchvision", "torchvision:NAME")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        raise InputError(f"torchvision has no classification model {name!r}.",
                         f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models().")
    kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    size = TORCHVISION_SIZES.get(name, 224)
    labels = None
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    what = "random weights"
    if weights == "pretrained":
        entry = torchvision.models.get_model_weights(name).DEFAULT
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        cached = folder / os.path.basename(entry.url)
        if not cached.is_file():
            raise InputError(f"The pretrained weights of torchvision:{name} are not in torch's cache (looked for "
                             f"{cached}); fxcompress does not download.",
                             f"download them once where there is network (torchvision.models.get_model({name!r}, "
                             f"weights='DEFAULT')), or give --weights FILE.")
        state = read_state_dict(cached)
        if num_classes is not None and num_classes != len(entry.meta["categories"]):
            # Keep the backbone, leave the new head as initialised.
            own = model.state_dict()
            state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(state, strict=False)
        else:
            model.load_state_dict(state)
            labels = list(entry.meta["categories"])
        what = f"pretrained weights {entry}"
    elif weights is not None:
        load_weights(model, weights, f"torchvision:{name}")
        what = f"weights {Path(weights).name}"
    summary = {"input_size": (3, size, size), "resize": int(size * 256 / 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
               "interpolation": "bilinear"}
    preprocess = _transform_preprocessor(_image_transform(size, summary["resize"], IMAGENET_MEAN, IMAGENET_STD), summary, labels)
    return LoadedModel(model, _image_inputs(preprocess, shapes), f"torchvision:{name} ({what})", "image-classification",
                       preprocess, f"torchvision:{name}")


# ---------------------------------------------------------------------------------------------
# timm

def load_timm(name: str, shapes=None, *, weights: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """``timm:NAME``: input size and normalization from the model's ``pretrained_cfg``;
    ``weights="pretrained"`` loads the cached hub file (offline), a path a weights file."""
    timm = require("timm", "timm:NAME")
    if not timm.list_models(name) and not timm.is_model(name.split(".")[0]):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise InputError(f"timm has no model {name!r}.", f"did you mean {', '.join(close)}?" if close else "see timm.list_models().")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    what = "random weights"
    if weights == "pretrained":
        cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
        file = _cached_timm_file(name, getattr(cfg, "hf_hub_id", None))
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": file})
        what = "pretrained weights from the local cache"
    try:
        model = timm.create_model(name, **kwargs).eval()
    except RuntimeError as exc:
        raise InputError(f"timm could not build {name} with these weights ({str(exc)[:200]}).",
                         "check --num-classes against the checkpoint's head.") from None
    if weights not in (None, "pretrained"):
        load_weights(model, weights, f"timm:{name}")
        what = f"weights {Path(weights).name}"
    config = timm.data.resolve_data_config({}, model=model)
    size = tuple(config["input_size"])
    resize = int(size[1] / config.get("crop_pct", 1.0))
    summary = {"input_size": size, "resize": resize, "mean": tuple(config["mean"]), "std": tuple(config["std"]),
               "interpolation": config.get("interpolation", "bilinear"), "crop_pct": config.get("crop_pct")}
    transform = _image_transform(size[1], resize, summary["mean"], summary["std"], summary["interpolation"])
    preprocess = _transform_preprocessor(transform, summary, None)
    return LoadedModel(model, _image_inputs(preprocess, shapes), f"timm:{name} ({what})", "image-classification",
                       preprocess, f"timm:{name}")


def _cached_timm_file(name: str, hub_id: str | None) -> str:
    from huggingface_hub import constants, try_to_load_from_cache

    if hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    raise InputError(f"The pretrained weights of timm:{name} ({hub_id or 'no hub id'}) are not in the Hugging Face cache "
                     f"at {constants.HF_HUB_CACHE}; fxcompress does not download.",
                     f"download them once where there is network (huggingface-cli download {hub_id}), or give --weights FILE.")


# ---------------------------------------------------------------------------------------------
# Hugging Face (transformers)

def resolve_hf(reference: str) -> Path:
    """A ``save_pretrained`` folder, or the cached snapshot folder of a hub id (never downloads)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json, so it is not a folder saved with save_pretrained.",
                             "point hf: at the folder model.save_pretrained() wrote (it holds config.json).")
        return path
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise InputError(f"hf:{reference} is not a folder.", "check the path, or give a hub id like org/name.")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(reference, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, an invalid id
        folder = Path(constants.HF_HUB_CACHE) / f"models--{reference.replace('/', '--')}"
        raise InputError(f"hf:{reference} is neither a folder nor a model in the local Hugging Face cache (looked in "
                         f"{folder}); fxcompress does not download.",
                         f"download it once where there is network (huggingface-cli download {reference}), or save it "
                         "with save_pretrained and give the folder: hf:PATH.") from None


def _hf_task(config: Any, task: str | None) -> str:
    if task is not None:
        if task not in HF_TASKS:
            raise InputError(f"Unknown --task {task!r}.", f"use one of {', '.join(HF_TASKS)}.")
        return task
    architecture = (getattr(config, "architectures", None) or [""])[0]
    for suffix, name in (("ForSequenceClassification", "text-classification"), ("ForImageClassification", "image-classification"),
                         ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("Model", "feature-extraction")):
        if architecture.endswith(suffix):
            return name
    raise InputError(f"The config's architectures ({architecture or 'none'}) do not say which task the model does.",
                     f"give --task ({', '.join(HF_TASKS)}).")


@contextlib.contextmanager
def _quiet_transformers(transformers: Any):
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def _inferred_task(config: Any) -> str | None:
    try:
        return _hf_task(config, None)
    except InputError:
        return None


def load_hf(reference: str, shapes=None, *, weights: str | None = None, num_classes: int | None = None,
            task: str | None = None, max_length: int | None = None) -> LoadedModel:
    """``hf:ID_OR_FOLDER``: the model class from the config's architectures (or ``task``), loaded
    with transformers' own ``from_pretrained`` (offline); example inputs from its tokenizer or
    image processor, in keyword form."""
    transformers = require("transformers", "hf:ID_OR_FOLDER")
    folder = resolve_hf(reference)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    task = _hf_task(config, task)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, architecture, None) if _inferred_task(config) == task else None
    if cls is None:
        cls = getattr(transformers, HF_TASKS[task])
    options: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32}
    if num_classes is not None:
        options.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    if weights not in (None, "pretrained") or not has_weights:
        if weights == "pretrained":
            raise InputError(f"{folder} holds no weights (no *.safetensors).", "save the model with save_pretrained, or give --weights FILE.")
        if num_classes is not None:
            config.num_labels = num_classes
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        what = "random weights" if weights is None else f"weights {Path(weights).name}"
        if weights is not None:
            load_weights(model, weights, f"hf:{reference}")
    else:
        with _quiet_transformers(transformers):  # "newly initialized" when the head changes, a progress bar
            model = cls.from_pretrained(folder, **options)
        what = "weights from the folder"
    model = model.eval()
    preprocess = _hf_preprocessor(transformers, folder, model.config, task, max_length)
    if task == "causal-lm":
        example = None  # compile_decoder builds its own inputs
    elif shapes:
        example = tuple(torch.randn(s) for s in shapes)
    elif preprocess.kind == "image":
        size = preprocess.summary.get("input_size", (3, 224, 224))
        example = preprocess.images([_example_image((size[2], size[1]))])
    else:
        example = preprocess.texts([EXAMPLE_TEXT])
    return LoadedModel(model, example, f"hf:{reference} ({type(model).__name__}, {what})", task, preprocess, str(folder))


def _hf_preprocessor(transformers: Any, folder: Path, config: Any, task: str, max_length: int | None) -> Preprocessor:
    id2label = getattr(config, "id2label", None) or {}
    labels = [id2label[i] for i in sorted(id2label)] if task.endswith("classification") and id2label else None

    def copy_config(target: Path) -> list[str]:
        config.save_pretrained(target)
        written = ["config.json"]
        generation = folder / "generation_config.json"
        if generation.is_file():
            text = generation.read_text()
            from fxcompress.export.atomic import write_atomically

            write_atomically(target / "generation_config.json", lambda tmp: tmp.write_text(text))
            written.append("generation_config.json")
        return written

    if task == "image-classification":
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"{folder} has no image processor ({str(exc).splitlines()[0][:160]}), so fxcompress cannot tell "
                             "the input size and normalization.",
                             "save the model's image processor into the folder (processor.save_pretrained(folder)).") from None

        def images(batch: list[Any]) -> dict[str, torch.Tensor]:
            return {"pixel_values": processor(images=[i.convert("RGB") for i in batch], return_tensors="pt")["pixel_values"]}

        def save(target: Path) -> list[str]:
            processor.save_pretrained(target)
            return ["preprocessor_config.json"] + copy_config(target)

        probe = images([_example_image((64, 64))])["pixel_values"]
        summary = {"input_size": tuple(probe.shape[1:]), "processor": type(processor).__name__}
        return Preprocessor("image", images=images, labels=labels, save=save, summary=summary)
    no_tokenizer = InputError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...), so fxcompress cannot turn "
                              "text into the model's inputs.",
                              "save the tokenizer into the folder (tokenizer.save_pretrained(folder)).")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the config alone
        raise no_tokenizer
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise no_tokenizer from None
    if tokenizer.pad_token is None:  # decoders often ship without one; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    length = max_length or min(DEFAULT_MAX_LENGTH, getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH)
    accepted = set(tokenizer.model_input_names)
    # Classifiers and encoders: one padded length, so every batch fits a graph captured with static
    # shapes. Causal LMs: prompts as they are (the decoder graph takes any length).
    padding = "longest" if task == "causal-lm" else "max_length"

    def texts(batch: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(list(batch), padding=padding, truncation=True, max_length=length, return_tensors="pt")
        return {k: v for k, v in encoded.items() if k in accepted}

    def save(target: Path) -> list[str]:
        files = [Path(f).name for f in tokenizer.save_pretrained(target)]
        return files + copy_config(target)

    return Preprocessor("text", texts=texts, labels=labels, tokenizer=tokenizer, save=save, max_length=length,
                        summary={"tokenizer": type(tokenizer).__name__, "max_length": length})


def load_model_spec(spec: str, shapes=None, *, weights: str | None = None, num_classes: int | None = None,
                    task: str | None = None, max_length: int | None = None) -> LoadedModel | None:
    """``hf:``, ``timm:`` or ``torchvision:`` specs; None for any other spec (fxcompress.loading
    resolves those)."""
    kind, _, name = spec.partition(":")
    if num_classes is not None and num_classes <= 0:
        raise InputError(f"--num-classes {num_classes} is not a positive number.", "give the number of classes of the head.")
    if kind == "hf":
        return load_hf(name, shapes, weights=weights, num_classes=num_classes, task=task, max_length=max_length)
    if task is not None:
        raise InputError(f"--task applies to hf: models, not {spec}.", "drop --task.")
    if kind == "timm":
        return load_timm(name, shapes, weights=weights, num_classes=num_classes)
    if kind == "torchvision":
        return load_torchvision(name, shapes, weights=weights, num_classes=num_classes)
    return None


__all__ = ["HF_TASKS", "LoadedModel", "Preprocessor", "load_hf", "load_model_spec", "load_timm", "load_torchvision",
           "read_state_dict", "resolve_hf"]
