"""Shared benchmark harness: the model set, the peer toolchains, parity and MAC counting, and
the machine description every result file carries.

Not part of the library (docs/design.md: ``benchmarks/`` is never an importable package); the scripts
beside this file put the repository root on ``sys.path`` and import it as ``common``.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Model set
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One benchmark model: a builder of (model, example inputs) for a batch size.

    ``top1`` says whether the first output's last axis is a class axis (classifier logits, LM
    logits), so top-1 agreement is meaningful; ``text`` marks integer token inputs.
    """

    name: str
    build: Callable[[int], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    top1: bool
    text: bool = False
    quick: bool = False


def calibrate_batchnorm(model: nn.Module, example: Callable[[int], tuple[torch.Tensor, ...]],
                        batches: int = 2, seed: int = 0) -> nn.Module:
    """Give every batch norm realistic, non-trivial statistics and affine parameters.

    Random-init BNs have mean 0 / var 1 / weight 1 / bias 0, which makes folding them a no-op and
    flatters any BN pass. Running statistics are instead measured on random inputs (so deep nets
    keep sane activations), then the affine parameters are perturbed.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    generator = torch.Generator().manual_seed(seed)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    with torch.no_grad():
        for _ in range(batches):
            model(*example(4))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()
        if m.affine:
            with torch.no_grad():
                m.weight.mul_(torch.rand(m.num_features, generator=generator) * 0.5 + 0.75)
                m.bias.add_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model


def unzero_weights(model: nn.Module) -> nn.Module:
    """Random values for weight matrices initialised to all zeros (torchvision's ViT head).

    fxcompress's remove-zero-branches rightly reduces such a model to a constant ``zeros``, and a
    benchmark or sweep would then measure nothing of the network behind the head.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model


def _image_input(size: int = 224) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda batch: (torch.randn(batch, 3, size, size),)


def _torchvision(arch: str) -> Callable[[int], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(batch: int):
        import torchvision

        torch.manual_seed(0)
        model = unzero_weights(getattr(torchvision.models, arch)(weights=None))
        calibrate_batchnorm(model, _image_input())
        return model.eval(), _image_input()(batch)

    return build


class FirstOutput(nn.Module):
    """Return one tensor of a transformers model's output (HF outputs are dict-like)."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids), self.field)


def _bert(layers: int, hidden: int, heads: int, vocab: int, seq: int):
    def build(batch: int):
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=hidden * 4, max_position_embeddings=max(512, seq))
        model = FirstOutput(BertModel(config, add_pooling_layer=False), "last_hidden_state").eval()
        return model, (torch.randint(0, vocab, (batch, seq)),)

    return build


def _gpt2(seq: int):
    def build(batch: int):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(use_cache=False)  # GPT-2 small: 12 layers, 768 wide, 50257 tokens
        model = FirstOutput(GPT2LMHeadModel(config), "logits").eval()
        return model, (torch.randint(0, config.vocab_size, (batch, seq)),)

    return build


class TinyCNN(nn.Module):
    """Two conv-bn-relu blocks and a classifier: the quick set's vision model (CI dry run)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(),
        )
        self.head = nn.Linear(width * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _tiny_cnn(batch: int):
    torch.manual_seed(0)
    model = calibrate_batchnorm(TinyCNN(), _image_input(32))
    return model.eval(), _image_input(32)(batch)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("resnet18", _torchvision("resnet18"), top1=True),
        ModelSpec("resnet50", _torchvision("resnet50"), top1=True),
        ModelSpec("mobilenet_v2", _torchvision("mobilenet_v2"), top1=True),
        ModelSpec("mobilenet_v3", _torchvision("mobilenet_v3_large"), top1=True),
        ModelSpec("efficientnet_b0", _torchvision("efficientnet_b0"), top1=True),
        ModelSpec("convnext_t", _torchvision("convnext_tiny"), top1=True),
        ModelSpec("vit_b_16", _torchvision("vit_b_16"), top1=True),
        # BERT encoder as in docs/design.md's peer figures: 4 layers, 384 wide, sequence 128.
        ModelSpec("bert_encoder", _bert(4, 384, 12, 30522, 128), top1=False, text=True),
        ModelSpec("gpt2", _gpt2(128), top1=True, text=True),
        ModelSpec("tiny_cnn", _tiny_cnn, top1=True, quick=True),
        ModelSpec("tiny_bert", _bert(1, 32, 2, 1000, 16), top1=False, text=True, quick=True),
    ]
}

FULL_SET = [name for name, spec in MODELS.items() if not spec.quick]
QUICK_SET = ["tiny_cnn"]


def random_inputs(spec: ModelSpec, example: Sequence[torch.Tensor], count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` input sets shaped like ``example``: normal images, or uniform token ids."""
    generator = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(count):
        one = []
        for t in example:
            if t.is_floating_point():
                one.append(torch.randn(t.shape, generator=generator, dtype=t.dtype))
            else:
                one.append(torch.randint(0, int(t.max()) + 1, t.shape, generator=generator, dtype=t.dtype))
        sets.append(tuple(one))
    return sets


# --------------------------------------------------------------------------------------------
# MACs
# --------------------------------------------------------------------------------------------


def count_macs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int | None:
    """Multiply-accumulates of one forward pass, from the conv / linear / matmul shapes.

    Uses fxcompress.analysis.macs (counts a captured graph's ``node.meta["val"]`` shapes) when the
    library has it, capturing plain modules first; else torch's FlopCounterMode, which counts
    the same ops from their shapes, halved.
    """
    try:
        from fxcompress.analysis.macs import count_macs as graph_macs
    except ImportError:
        graph_macs = None
    try:
        if graph_macs is not None:
            graph = model
            if not (isinstance(model, torch.fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes)):
                from fxcompress.capture import capture

                with quiet():
                    graph = capture(model, tuple(inputs))
            return int(graph_macs(graph))
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(*inputs)
        return int(counter.get_total_flops() // 2)
    except Exception:  # noqa: BLE001 - a MAC count is informative, never worth failing a row
        return None


# --------------------------------------------------------------------------------------------
# Peers: what a user would run instead of fxcompress
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet():
    """Silence exporter chatter (progress lines, warnings) so logs show results."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_plain(model: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    """What a user does without us: ``torch.onnx.export(model, args, dynamo=True)``."""
    with quiet():
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=True, external_data=False)
    return path


def simplify_onnxsim(source: Path, path: Path) -> Path:
    """onnxsim on the plain export; raises if onnxsim reports the result unchecked."""
    import onnx
    import onnxsim

    with quiet():
        simplified, ok = onnxsim.simplify(onnx.load(str(source)))
    if not ok:
        raise RuntimeError("onnxsim could not validate its simplified model")
    onnx.save(simplified, str(path))
    return path


class CalibrationReader(CalibrationDataReader):
    """ORT's calibration interface over a list of input tuples (the same 16 our presets get)."""

    def __init__(self, names: Sequence[str], batches: Sequence[Sequence[torch.Tensor]]) -> None:
        self._items = iter([{n: t.numpy() for n, t in zip(names, batch)} for batch in batches])

    def get_next(self):
        return next(self._items, None)


def _preprocessed(source: Path, work: Path) -> Path:
    """The model as ORT's quantizers want it: stale shape annotations dropped, then ORT's
    recommended quant_pre_process (shape inference + optimization) where that succeeds.

    The dynamo exporter's value_info can disagree with ONNX shape inference (seen: a Linear's
    transposed weight), which makes quantize_dynamic fail outright; re-inferring is what a user
    would do.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(source))
    del model.graph.value_info[:]
    clean = work / f"{source.stem}.clean.onnx"
    onnx.save(model, str(clean))
    target = work / f"{source.stem}.pre.onnx"
    # ORT's optimizer step has produced models ORT itself then refuses to load (seen: a BERT
    # encoder, "Attempt to replace the existing tensor"); fall back step by step.
    for skip_optimization in (False, True):
        try:
            with quiet():
                quant_pre_process(str(clean), str(target), skip_symbolic_shape=True, skip_optimization=skip_optimization)
            options = ort.SessionOptions()
            options.log_severity_level = 4  # the failure is handled here, not worth a red log line
            ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
            return target
        except Exception:  # noqa: BLE001 - quantizing the unprocessed model is still what a user gets
            continue
    return clean


def quantize_ort_static(source: Path, path: Path, calibration: Sequence[Sequence[torch.Tensor]]) -> Path:
    """ORT quantize_static at its fastest x86 setting (docs/design.md): QDQ, per-channel, U8S8, MinMax."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = _preprocessed(source, path.parent)
    graph = onnx.load(str(pre), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    reader = CalibrationReader(names, calibration)
    with quiet():
        quantize_static(str(pre), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return path


def quantize_ort_dynamic(source: Path, path: Path) -> Path:
    """ORT quantize_dynamic with its defaults (int8 weights, activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = _preprocessed(source, path.parent)
    with quiet():
        quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8)
    return path


# --------------------------------------------------------------------------------------------
# Parity against torch eager fp32
# --------------------------------------------------------------------------------------------


def parity(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]], top1: bool) -> dict[str, Any]:
    """Cosine similarity (worst output, worst input set), drift, and top-1 agreement.

    Top-1 agreement is the share of positions whose argmax over the last axis of the first output
    matches the reference: per image for classifiers, per token for language-model logits.
    """
    from fxcompress.numerics import compare_outputs

    cosines, drifts, agreements = [], [], []
    for ref, got in zip(reference, candidate):
        got = [np.asarray(g, dtype=np.float64) for g in got]
        for comparison in compare_outputs(ref, got):
            cosines.append(comparison.cosine)
            drifts.append(comparison.drift)
        if top1:
            agreements.append(float((ref[0].argmax(-1) == got[0].argmax(-1)).mean()))
    return {
        "cosine": float(min(cosines)) if cosines else None,
        "drift": float(max(drifts)) if drifts else None,
        "top1": float(np.mean(agreements)) if agreements else None,
    }


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown").strip()
    flags = fields.get("Flags", "")
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags.split()]
    return f"{model} ({', '.join(features)})" if features else model


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        # benchmarks/results is what runs write: a run resuming after its own first model must not call itself dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description(provider_used: str | None = None) -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, GPU and the provider that really ran."""
    import onnxruntime as ort

    info: dict[str, Any] = {
        "cpu": _lscpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": f"{ort.__version__} ({ort.get_device()})",
        "ort_providers_available": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git": _git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    with contextlib.suppress(ImportError):
        import onnx

        info["onnx"] = onnx.__version__
    if provider_used is not None:
        info["provider_used"] = provider_used
    return info


def command_line() -> str:
    """The exact command that produced a result, relative to the repository root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


def write_results(folder: str | os.PathLike, name: str, report: dict[str, Any], markdown: str) -> None:
    """``report`` as ``folder/name.json`` and ``markdown`` as ``folder/name.md``; the table printed too."""
    import json

    out = Path(folder) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def first_line(exc: BaseException) -> str:
    """An exception as one short line for a result row."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300]
