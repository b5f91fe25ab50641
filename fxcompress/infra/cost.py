"""What a compile will cost in memory, checked against what the machine has before any work.

A compile holds the user's weights once (shared, fxcompress.infra.weights), plus what the recipe
makes new: folded or quantized copies of the weights it changes, GPTQ's per-layer Hessians, and
at export the ONNX model and one ONNX Runtime session for parity. Measured peaks above the
process's baseline (benchmarks/results/scaling_memory.md) are below :data:`PEAK_FACTOR` times
the model's weight bytes as stored (fp32 models measured; a bf16 / fp16 model is held in its own
dtype, so its bytes as stored are what the passes, export and parity hold); the check asks for that much to be available (``MemAvailable``
in /proc/meminfo), so that a model too big for the machine fails at once with a clear message
instead of an allocator crash an hour in.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from fxcompress.errors import InputError
from fxcompress.numerics import float_tensors

#: Peak resident memory a compile + export adds, in multiples of the weight bytes as stored (measured on fp32 models), by recipe
#: (the weights themselves, already in memory, excluded); recipes not named take ``"*"``.
PEAK_FACTOR = {"*": 4.0}
#: Fixed working memory of a compile besides the weights (torch.export, the exporter, ORT).
FIXED_BYTES = 1 * 1024**3
#: Set to 1 to skip the check (the estimate is conservative; a machine with swap may manage).
SKIP_ENV = "FXCOMPRESS_SKIP_MEMORY_CHECK"


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s float parameters and buffers as stored (each tensor once): a bf16 /
    fp16 model is compiled and exported in its own dtype (docs/cost.md), so that is what is held."""
    return sum(t.nelement() * t.element_size() for t in float_tensors(model))


def required_memory(model: nn.Module, recipe: str) -> int:
    """Bytes a compile + export of ``model`` with ``recipe`` needs beyond what is already resident."""
    return int(weight_bytes(model) * PEAK_FACTOR.get(recipe, PEAK_FACTOR["*"])) + FIXED_BYTES


def check_memory(model: nn.Module, recipe: str) -> None:
    """InputError when compiling ``model`` with ``recipe`` needs more memory than is available."""
    if os.environ.get(SKIP_ENV) == "1" or not isinstance(model, nn.Module):
        return
    available = available_memory()
    if available is None:
        return
    needed = required_memory(model, recipe)
    if needed > available:
        gb = 1024**3
        raise InputError(
            f"Compiling this model ({weight_bytes(model) / gb:.2f} GB of weights) with recipe '{recipe}' needs about "
            f"{needed / gb:.1f} GB of free memory, and this machine has {available / gb:.1f} GB available.",
            "free memory (close other processes), use a machine with more memory, or compile a smaller model; "
            f"set {SKIP_ENV}=1 to try anyway (the estimate is conservative: docs/cost.md).",
        )


__all__ = ["FIXED_BYTES", "PEAK_FACTOR", "SKIP_ENV", "available_memory", "check_memory", "required_memory", "weight_bytes"]
