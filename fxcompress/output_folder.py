"""A deployable output folder: the ONNX file(s), the tokenizer / preprocessor files, the model's
config and ``manifest.json`` (recipe, passes, parity and metric figures, provider, versions).

    with OutputFolder("out/") as folder:
        result.export_onnx(folder.path("model.onnx"))
        folder.write_manifest({...})
    # out/ appears complete, or not at all

Everything is written into a hidden staging folder beside the target and renamed into place at
the end, so a failure at any step leaves no half-written folder (and an earlier output folder
of fxcompress at the same path stays until the new one is complete). Files are written with
:func:`fxcompress.export.atomic.write_atomically` and get ordinary umask modes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fxcompress.errors import ExportError, InputError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fxcompress-output/1"


def is_folder_target(out: str | os.PathLike) -> bool:
    """Whether ``--out`` names a folder: it ends with a slash, is an existing folder, or has no ``.onnx`` suffix."""
    text = os.fspath(out)
    return text.endswith(("/", os.sep)) or Path(text).is_dir() or Path(text).suffix.lower() != ".onnx"


def check_output_folder(out: str | os.PathLike) -> Path:
    """``out`` can become an output folder: its parent exists and is writable, and it is absent,
    empty, or an earlier fxcompress output folder (which is replaced)."""
    target = Path(out)
    parent = target.parent if str(target.parent) else Path(".")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file, not a folder.", "give a new folder name (--out DIR/), or a .onnx file name.")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ExportError(f"{target} is a folder with other files in it (no {MANIFEST}), which fxcompress will not replace.",
                          "give a new or empty folder, or an earlier fxcompress output folder.")
    if not parent.is_dir():
        raise ExportError(f"Output folder {parent} does not exist.", f"create it first (mkdir -p {parent}) or choose another path.")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"Output folder {parent} is not writable.", "choose a folder you can write to.")
    return target


class OutputFolder:
    """A staging folder that becomes ``target`` on :meth:`commit` (a ``with`` block commits on
    success and removes everything on failure)."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = check_output_folder(target)
        parent = self.target.parent if str(self.target.parent) else Path(".")
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".partial", dir=parent))
        except OSError as exc:
            raise ExportError(f"Cannot create a folder in {parent} ({exc.strerror or exc}).", "choose a folder you can write to.") from None
        self.files: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` (listed in the manifest)."""
        if name not in self.files:
            self.files.append(name)
        return self.staging / name

    def add(self, names: list[str]) -> None:
        """Record files a library wrote into :attr:`staging` itself (save_pretrained)."""
        self.files.extend(n for n in names if n not in self.files and (self.staging / n).exists())

    def add_external_data(self) -> None:
        """Record the ``NAME.onnx.data`` files export writes beside ONNX files over the 2 GB
        protobuf limit (docs/cost.md): they deploy with the file that reads them."""
        self.add([name + ".data" for name in list(self.files) if name.endswith(".onnx")])

    def write_json(self, name: str, data: Any) -> Path:
        from fxcompress.export.atomic import write_atomically

        text = json.dumps(data, indent=2, default=str) + "\n"
        return write_atomically(self.path(name), lambda tmp: tmp.write_text(text))

    def commit(self) -> Path:
        """Rename the staging folder to the target (replacing an earlier fxcompress output folder)."""
        from fxcompress.export.atomic import current_umask

        os.chmod(self.staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        try:
            os.replace(self.staging, self.target)
        except OSError as exc:
            if old is not None:
                os.replace(old, self.target)
            raise ExportError(f"Moving the output into {self.target} failed ({exc.strerror or exc}).", "choose another folder.") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


#: onnxruntime-genai's file beside a decoder's graph: what ``og.Model(folder)`` loads
GENAI_CONFIG = "genai_config.json"


def genai_config(model: Any, spec: Any, filename: str = "model.onnx") -> dict[str, Any]:
    """``genai_config.json`` for a decoder folder, so that onnxruntime-genai's ``og.Model(folder)``
    runs ``filename`` (the decode graph; it serves the prompt step too).

    The graph's names and layout are those onnxruntime-genai's own builder writes (``input_ids``,
    ``attention_mask``, ``position_ids``, ``past_key_values.N.key|value`` in, ``logits`` and
    ``present.N.key|value`` out, caches ``[batch, kv_heads, length, head_size]``); the cache grows
    by concatenation, so past and present share no buffer. ``model`` is the transformers causal LM
    (its config gives the sizes and the type), ``spec`` the
    :class:`~fxcompress.capture_decoder.DecoderSpec` (special tokens, sampling defaults). The
    type is taken as onnxruntime-genai's builder takes it (the architecture's name before
    ``For``, lower case); onnxruntime-genai refuses types it does not know ("Unsupported model_type").
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    context = int(getattr(text, "max_position_embeddings", 0) or getattr(text, "n_positions", 0) or spec.max_length)
    eos = list(spec.eos_token_ids)
    return {
        "model": {
            "bos_token_id": getattr(config, "bos_token_id", None),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": spec.kv_shapes[0][1],
                "hidden_size": text.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_shapes[0][0],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0),
            "type": architecture[:architecture.find("For")].lower() if "For" in architecture else architecture.lower(),
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": spec.do_sample, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": spec.temperature, "top_k": spec.top_k or 50, "top_p": spec.top_p,
        },
    }


def versions() -> dict[str, str]:
    """Versions of the libraries that made the files (for the manifest)."""
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("fxcompress", "torch", "onnx", "onnxruntime-gpu", "onnxruntime", "transformers", "timm", "torchvision"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    from fxcompress.version import __version__

    found["fxcompress"] = __version__
    return found


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an output folder; InputError if the folder has none or it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} has no {MANIFEST}, so it is not an fxcompress output folder.",
                         "give a folder written by fxcompress compile --out DIR/, or an .onnx file.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} cannot be read ({type(exc).__name__}).", "compile again to rewrite the folder.") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not an fxcompress manifest (format {data.get('format') if isinstance(data, dict) else '?'}).",
                         "compile again to rewrite the folder.")
    return data


def render_manifest(data: dict[str, Any]) -> str:
    """The manifest as a few lines of text (what ``fxcompress inspect DIR`` prints first)."""
    lines = [f"fxcompress output folder: {data.get('source', '?')} ({data.get('task') or 'task unknown'})",
             f"  recipe: {data.get('recipe')}   passes that changed the graph: {', '.join(data.get('passes') or []) or 'none'}"]
    if data.get("note"):
        lines.append(f"  note: {data['note']}")
    for name, info in (data.get("graphs") or {}).items():
        io_text = f"inputs {', '.join(info.get('inputs', []))} -> outputs {', '.join(info.get('outputs', []))}"
        lines.append(f"  {name}: {info.get('bytes', 0) / 1e6:.2f} MB, {io_text}")
    parity = data.get("parity") or {}
    if parity:
        lines.append(f"  parity vs the original: {parity.get('summary', parity)}")
    metric = data.get("metric")
    if metric:
        shown = "{:.2%}" if metric.get("name") == "top1" else "{:.4f}"
        rows = ", ".join(f"{k} {shown.format(v['value'])}" for k, v in metric.get("values", {}).items())
        lines.append(f"  {metric.get('name')} on {metric.get('data')}: {rows}")
    lines.append(f"  provider: {data.get('provider')}   files: {', '.join(data.get('files', []))}")
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in (data.get("versions") or {}).items()))
    return "\n".join(lines)


__all__ = ["MANIFEST", "OutputFolder", "check_output_folder", "is_folder_target", "read_manifest", "render_manifest", "versions"]
