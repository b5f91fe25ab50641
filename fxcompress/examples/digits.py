"""The built-in example: a small CNN trained on scikit-learn's bundled digits, compiled with every
preset, exported, and compared with the original on accuracy (through ONNX Runtime), file size
and latency (interleaved in one process).

The digits set (1,797 8x8 grey images, 10 classes) ships inside scikit-learn, so the demo needs
no download and trains in seconds on 2 CPU cores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fxcompress.errors import InputError, FxCompressError


class DigitsCNN(nn.Module):
    """Two conv-bn-relu blocks and a classifier: small, but with everything passes act on."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width * 2, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(width * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def _separable(channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    """Depthwise 3x3 conv-bn-relu, then pointwise 1x1 conv-bn-relu (MobileNet v1's block)."""
    return [
        nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
        nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        nn.Conv2d(channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    ]


class DigitsMobileNet(nn.Module):
    """A MobileNet-style CNN for the digits: a stem conv, then depthwise-separable blocks.

    Depthwise convs give per-channel ranges as uneven as in large MobileNets once batch norm is
    folded into them: the case cross-layer equalization and bias correction exist for. ReLU
    (not ReLU6) between the layers, so ``equalize-layers`` can rescale every pair exactly.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            *_separable(width, width * 2),
            *_separable(width * 2, width * 4, stride=2),
            *_separable(width * 4, width * 4),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@dataclass
class DigitsData:
    """Train/test split of the digits set as float tensors scaled to [0, 1], shape [N, 1, 8, 8]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(seed: int = 0, test_share: float = 0.25) -> DigitsData:
    """scikit-learn's bundled digits, split reproducibly."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("The demo needs scikit-learn for its bundled digits data.",
                         "pip install 'fxcompress[demo]' (or scikit-learn).") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(len(x) * (1 - test_share))
    train, test = order[:split], order[split:]
    return DigitsData(x[train], y[train], x[test], y[test])


def train(model: nn.Module, data: DigitsData, epochs: int = 8, lr: float = 3e-3, seed: int = 0,
          batch_size: int = 64, schedule: str = "constant") -> nn.Module:
    """Plain Adam training; works for the original model and for ``result.module`` (fine-tuning).

    ``schedule`` is ``"constant"`` (the default) or ``"cosine"``: the learning rate decays from
    ``lr`` to 0 over all ``epochs`` (step by step), which helps a short fine-tuning run settle.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', not {schedule!r}")
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(data.x_train) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if schedule == "cosine" and steps else None
    return run_epochs(model, (data.x_train,), data.y_train, nn.CrossEntropyLoss(), optimizer, scheduler, epochs, batch_size)


def run_epochs(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, loss: Callable[[Any, torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler: Any, epochs: int, batch_size: int) -> nn.Module:
    """The shuffled mini-batch loop of the digits trainers (seeded by the caller): ``loss(model(*batch), labels)``
    per step, the scheduler (if any) stepped after each; returns the model in eval mode."""
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad()
            loss(model(*(x[idx] for x in inputs)), labels[idx]).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return model.eval()


def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def padded_batches(inputs: tuple[torch.Tensor, ...], batch: int):
    """Yield ``(chunk, real)``: ``batch`` examples of every input at a time, the last partial
    chunk padded with copies of its last example (for files with a fixed batch); ``real`` of them count."""
    for i in range(0, len(inputs[0]), batch):
        chunk = [t[i:i + batch] for t in inputs]
        real = len(chunk[0])
        if real < batch:
            chunk = [torch.cat([t, t[-1:].expand(batch - real, *t.shape[1:])]) for t in chunk]
        yield tuple(chunk), real


def onnx_accuracy(path: str | os.PathLike, x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor,
                  batch: int = 1) -> float:
    """Accuracy of an ONNX classifier in ORT (CPU provider), fed ``batch`` examples at a time.

    ``x`` is one input tensor or a tuple of them (an encoder's tokens and mask); the first output
    is the logits.
    """
    from fxcompress.runtime.session import create_session

    session = create_session(path, "cpu")
    correct = 0
    for i, (chunk, real) in enumerate(padded_batches(x if isinstance(x, tuple) else (x,), batch)):
        logits = session.run(tuple(t.numpy() for t in chunk))[0][:real]
        correct += int((logits.argmax(1) == y[i * batch:i * batch + real].numpy()).sum())
    return correct / len(y)


def prune_and_fine_tune(model: nn.Module, data: DigitsData, ratio: float = 0.5, epochs: int = 8):
    """``prune`` (L2 group importance) of ``model``, then a user's fine-tuning loop on ``result.module``.

    Pruning alone costs most of the accuracy (the model lost half its channels); eight epochs of
    the plain training loop on the pruned module, with small batches (8: more steps in the same
    epochs) and a cosine decay so the short run ends settled, bring it back within about a point
    (three were enough on a Xeon with AVX-512; on an AVX2-only EPYC they left the demo's CNN 1.3
    points below fp32, 2026-12-07). Returns the CompileResult, whose
    module is the fine-tuned one (export it with ``result.export_onnx``).
    """
    import fxcompress
    from fxcompress.passes.presets import prune

    recipe = prune().set_options("prune-channels", {"ratio": ratio, "importance": "l2"})
    result = fxcompress.compile(model, (data.x_train[:1],), recipe)
    train(result.module, data, epochs=epochs, batch_size=8, schedule="cosine")
    return result


#: Presets the demo tries, in order; those not (yet) registered are skipped with a note. ``prune``
#: is shown the way it is used: followed by fine-tuning, then also through ``int8``.
DEMO_RECIPES = ("default", "int8", "prune", "sparse-2:4", "fp16")


def run_demo(out_dir: Path, epochs: int = 8) -> int:
    """Train, compile with each available preset, export, and print the comparison table."""
    import fxcompress
    from fxcompress.passes.presets import PRESETS
    from fxcompress.runtime.session import create_session
    from fxcompress.runtime.timing import make_runner, time_interleaved

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_data()
    start = time.perf_counter()
    torch.manual_seed(0)  # the initial weights too: what earlier imports drew from the RNG must not matter
    model = train(DigitsCNN(), data, epochs=epochs)
    print(f"Trained DigitsCNN on scikit-learn digits ({len(data.x_train)} train / {len(data.x_test)} test images) "
          f"in {time.perf_counter() - start:.1f} s; PyTorch test accuracy {torch_accuracy(model, data.x_test, data.y_test):.2%}")
    example = (data.x_train[:1],)
    calibration = [(data.x_train[i:i + 1],) for i in range(0, 256, 16)]
    rows = []
    baseline = fxcompress.compile(model, example, [])
    plain_path = baseline.export_onnx(out_dir / "digits_plain.onnx")
    rows.append(("plain torch.onnx.export", plain_path, None))
    for name in DEMO_RECIPES:
        if name not in PRESETS:
            continue
        print(f"\n=== recipe '{name}' ===")
        try:
            if name == "prune":
                result = prune_and_fine_tune(model, data)
                print("(then 8 epochs of fine-tuning of result.module)")
            else:
                result = fxcompress.compile(model, example, name, calibration=calibration)
        except FxCompressError as exc:
            print(f"skipped: {exc}")
            continue
        result.report.print_table()
        path = result.export_onnx(out_dir / f"digits_{name.replace(':', '-')}.onnx")
        print(f"parity vs compiled module: {result.report.parity.to_text()}")
        label = "fxcompress prune+tune" if name == "prune" else f"fxcompress {name}"
        rows.append((label, path, result))
        if name == "prune" and "int8" in PRESETS:
            print("\n=== the fine-tuned pruned module through recipe 'int8' ===")
            both = fxcompress.compile(result.module, example, "int8", calibration=calibration)
            both.report.print_table()
            path = both.export_onnx(out_dir / "digits_prune-int8.onnx")
            rows.append(("fxcompress prune+tune+int8", path, both))
    runners = {label: make_runner(create_session(path, "cpu"), example) for label, path, _ in rows}
    timing = time_interleaved(runners, rounds=10, block=8)
    print("\nDigits CNN: accuracy through ONNX Runtime (CPU provider), file size, latency at batch 1 (interleaved, 80 runs each)")
    print(f"{'variant':<26} {'accuracy':>9} {'size KB':>9} {'p50 ms':>8} {'speedup':>8}")
    base_ms = timing[rows[0][0]]["p50_ms"]
    for label, path, _ in rows:
        acc = onnx_accuracy(path, data.x_test, data.y_test)
        p50 = timing[label]["p50_ms"]
        print(f"{label:<26} {acc:>9.2%} {os.path.getsize(path) / 1024:>9.1f} {p50:>8.3f} {base_ms / p50:>7.2f}x")
    print(f"\nONNX files written to {out_dir.resolve()}")
    return 0
