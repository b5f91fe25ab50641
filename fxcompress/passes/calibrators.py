"""Calibration: stream user data through a graph, observe tensors, and choose quantization ranges.

Four calibrators choose the clipping range ``[lo, hi]`` of an activation from what it took on the
calibration data:

* ``minmax``: the observed minimum and maximum (what ORT's ``quantize_static`` uses by default).
* ``percentile``: clip the magnitude at the ``percentile``-th percentile of ``|x|``, so a few
  outliers do not stretch the scale for everything else.
* ``entropy``: the TensorRT/KL method: the magnitude threshold whose quantized distribution
  keeps the most information (smallest KL divergence from the observed histogram).
* ``mse``: the magnitude threshold minimising the expected squared error (clipping error of the
  tail plus rounding error ``scale**2 / 12`` of everything inside).

All but ``minmax`` work on a histogram of ``|x|`` over ``[0, max|x|]`` built in a second pass over
the data (the first pass finds the maxima), so memory stays bounded whatever the data size.
A magnitude threshold ``T`` becomes the range ``[max(min, -T), min(max, T)]``.

The batches come from the compile's :class:`~fxcompress.calibration.Calibration`
(``context.calibration.take(graph_module, pass_name, limit)``), checked against the example inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import fx


Calibrator = Literal["minmax", "percentile", "entropy", "mse"]
CALIBRATORS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")

#: Histogram resolution: fine enough that the chosen thresholds are within 0.05% of max|x|.
HISTOGRAM_BINS = 2048


@dataclass
class TensorStats:
    """What was observed of one tensor over all calibration batches."""

    minimum: float = math.inf
    maximum: float = -math.inf
    histogram: torch.Tensor | None = None  # counts of |x| over [0, amax], HISTOGRAM_BINS bins

    @property
    def amax(self) -> float:
        return max(abs(self.minimum), abs(self.maximum))

    def observe_range(self, value: torch.Tensor) -> None:
        low, high = torch.aminmax(value.detach())
        self.minimum = min(self.minimum, float(low))
        self.maximum = max(self.maximum, float(high))

    def observe_histogram(self, value: torch.Tensor) -> None:
        amax = self.amax
        counts = torch.histc(value.detach().abs().float().flatten(), bins=HISTOGRAM_BINS, min=0.0, max=amax if amax > 0 else 1.0)
        self.histogram = counts if self.histogram is None else self.histogram + counts


# ---------------------------------------------------------------------------------------------
# Observation


class _Observer(fx.Interpreter):
    """Runs the graph and hands the value of each watched node to a callback."""

    def __init__(self, module: fx.GraphModule, watched: dict[fx.Node, Callable[[torch.Tensor], None]]) -> None:
        super().__init__(module)
        self.watched = watched

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        callback = self.watched.get(n)
        if callback is not None and isinstance(value, torch.Tensor):
            callback(value)
        return value


def observe(module: fx.GraphModule, nodes: Sequence[fx.Node], batches: Sequence[tuple[torch.Tensor, ...]],
            calibrator: str, progress: bool = False,
            also: dict[fx.Node, Callable[[torch.Tensor], None]] | None = None) -> dict[fx.Node, TensorStats]:
    """Run ``batches`` through ``module`` and collect the statistics ``calibrator`` needs per node.

    ``also``: more callbacks (node -> callback of its value) run in the first pass over the data,
    for statistics another pass would otherwise collect in a pass of its own (correct-bias's float means).
    """
    stats = {n: TensorStats() for n in nodes}
    passes = [("range", TensorStats.observe_range)]
    if calibrator != "minmax":
        passes.append(("histogram", TensorStats.observe_histogram))
    bar = _progress(len(batches) * len(passes), progress)
    with torch.no_grad():
        for index, (_, method) in enumerate(passes):
            watched: dict[fx.Node, Callable[[torch.Tensor], None]] = {
                n: (lambda v, s=stats[n], m=method: m(s, v)) for n in nodes}
            for n, callback in (also or {}).items() if index == 0 else ():
                own = watched.get(n)
                watched[n] = callback if own is None else (lambda v, a=own, b=callback: (a(v), b(v)))
            interpreter = _Observer(module, watched)
            for batch in batches:
                interpreter.run(*batch)
                bar.update(1)
    bar.close()
    return stats


def observe_channel_ranges(module: fx.GraphModule, nodes: Sequence[fx.Node], batches: Sequence[tuple[torch.Tensor, ...]],
                           dim: int = 1) -> dict[fx.Node, torch.Tensor]:
    """Largest ``|x|`` of each channel (along ``dim``) of each node's value over ``batches``, float64.

    What equalization (channels on dim 1 of a conv output) and activation smoothing (channels on
    the last dim of a LayerNorm output) need: which channels carry the range, not only how large
    the tensor's range is.
    """
    ranges: dict[fx.Node, torch.Tensor] = {}

    def record(node: fx.Node, value: torch.Tensor) -> None:
        amax = value.detach().abs().movedim(dim, 0).reshape(value.shape[dim], -1).amax(dim=1).double()
        ranges[node] = amax if node not in ranges else torch.maximum(ranges[node], amax)

    watch_values(module, {n: (lambda v, n=n: record(n, v)) for n in nodes}, batches)
    return ranges


def watch_values(module: fx.GraphModule, watched: dict[fx.Node, Callable[[torch.Tensor], None]],
                 batches: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """Run ``batches`` through ``module`` (no grad), handing each watched node's value to its callback.

    For statistics none of the functions above collect (quantize-weights: the ``X^T X`` of each
    linear layer's input, for GPTQ).
    """
    interpreter = _Observer(module, watched)
    with torch.no_grad():
        for batch in batches:
            interpreter.run(*batch)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating", unit="batch", leave=False)


# ---------------------------------------------------------------------------------------------
# Range choice


def choose_range(stats: TensorStats, calibrator: str, percentile: float = 99.99,
                 levels: int = 256) -> tuple[float, float]:
    """The clipping range ``[lo, hi]`` (always containing 0) the calibrator picks for one tensor."""
    lo, hi = min(stats.minimum, 0.0), max(stats.maximum, 0.0)
    if calibrator == "minmax" or stats.histogram is None or stats.amax == 0:
        return lo, hi
    hist = stats.histogram.double()
    width = stats.amax / len(hist)
    if calibrator == "percentile":
        cdf = torch.cumsum(hist, 0) / hist.sum()
        index = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=torch.float64)))
        threshold = min(index + 1, len(hist)) * width
    elif calibrator == "entropy":
        # A one-sided tensor (after ReLU) spends all levels on [0, T]; a signed one half of them.
        threshold = _kl_threshold(hist, width, levels if lo == 0 else levels // 2)
    elif calibrator == "mse":
        threshold = _mse_threshold(hist, width, levels, one_sided=lo == 0)
    else:
        raise ValueError(f"unknown calibrator {calibrator!r}")
    return max(lo, -threshold), min(hi, threshold)


def _kl_threshold(hist: torch.Tensor, width: float, levels: int) -> float:
    """Magnitude threshold minimising KL(P || Q): P the clipped histogram, Q its ``levels``-bin quantization."""
    bins = len(hist)
    best, best_i = math.inf, bins
    # Candidate thresholds every 16 bins: enough resolution, 16x fewer candidates than every bin.
    for i in range(max(levels, 128), bins + 1, 16):
        p = hist[:i].clone()
        p[i - 1] += hist[i:].sum()  # clipped mass lands in the last bin
        # Quantize the first i bins into `levels` groups, spreading each group's mass evenly over
        # its non-empty bins (as TensorRT does).
        source = hist[:i]
        group = (torch.arange(i) * levels) // i
        nonzero = (source > 0).double()
        sums = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, group, source)
        counts = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, group, nonzero)
        q = nonzero * sums[group] / counts[group].clamp(min=1)
        mask = p > 0
        if not bool((q[mask] > 0).all()):
            q = q + 1e-12
        pn, qn = p / p.sum(), q / q.sum()
        kl = float((pn[mask] * torch.log(pn[mask] / qn[mask])).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def _mse_threshold(hist: torch.Tensor, width: float, levels: int, one_sided: bool) -> float:
    """Magnitude threshold minimising clipping error plus uniform rounding error on the histogram."""
    bins = len(hist)
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    best, best_t = math.inf, bins * width
    for i in range(16, bins + 1, 8):
        t = i * width
        step = (t if one_sided else 2 * t) / (levels - 1)
        inside = hist[:i].sum()
        clipped = ((centers[i:] - t) ** 2 * hist[i:]).sum()
        err = float(inside * step * step / 12 + clipped)
        if err < best:
            best, best_t = err, t
    return best_t


@dataclass(frozen=True)
class AffineParams:
    """Per-tensor affine quantization parameters (ONNX QuantizeLinear semantics)."""

    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    lo: float = 0.0
    hi: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def affine_params(lo: float, hi: float, dtype: str = "uint8") -> AffineParams:
    """Scale and zero point mapping ``[lo, hi]`` (containing 0) onto uint8 (asymmetric) or int8 (symmetric).

    The scale is rounded to float32 because both torch's fake-quant and ONNX QuantizeLinear use a
    float32 scale; the zero point is rounded half to even like ORT's quantizer.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if dtype == "uint8":
        qmin, qmax = 0, 255
        scale = (hi - lo) / 255.0
        scale = scale if scale > 0 else 1.0
        scale = float(torch.tensor(scale, dtype=torch.float32))
        zero_point = int(min(max(round(-lo / scale), 0), 255))
    elif dtype == "int8":
        qmin, qmax = -128, 127
        scale = max(abs(lo), abs(hi)) / 127.0
        scale = float(torch.tensor(scale if scale > 0 else 1.0, dtype=torch.float32))
        zero_point = 0
    else:
        raise ValueError(f"unsupported activation dtype {dtype!r}")
    return AffineParams(scale, zero_point, qmin, qmax, lo, hi)


#: Weight dtypes the weight quantizers take, each weight read as stored (a bf16 / fp16 model is not
#: upcast whole: scales and codes are computed from one weight at a time in float32).
FLOAT_WEIGHTS = (torch.float32, torch.bfloat16, torch.float16)


def symmetric_weight_scales(weight: torch.Tensor, axis: int, levels: int = 127) -> torch.Tensor:
    """Per-channel symmetric int8 scales (``max|w| / levels`` along every dim but ``axis``), float32.

    ``levels=63`` keeps the integers within -63..63 (:func:`u8s8_saturates`).
    """
    dims = [d for d in range(weight.dim()) if d != axis % weight.dim()]
    amax = weight.detach().abs().amax(dim=dims) if dims else weight.detach().abs()
    scale = amax.float() / float(levels)
    # All-zero channels still need a positive scale; 1.0 maps their zeros to zero exactly.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def u8s8_saturates() -> bool:
    """Whether this CPU computes ONNX Runtime's uint8 x int8 products with a saturating instruction.

    On x86 without VNNI (AVX2 only: AMD before Zen 4, Intel before Cascade Lake) ORT's MLAS kernels
    multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds two products into a
    saturating int16: ``255 * 127 * 2`` overflows it, and the file computes something else than the
    module (measured on an AVX2 EPYC: MatMulInteger columns off by up to 40%). Weights within
    -63..63 cannot overflow it (``255 * 63 * 2 < 32767``); ORT's quantizers call that ``reduce_range``.
    VNNI (``vpdpbusd``) and ARM accumulate in int32 and never saturate.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:  # not Linux: assume a current CPU
        return False
    return bool(flags) and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


#: Choices of the quantizers' ``weight_range`` option (see :func:`weight_levels`).
WEIGHT_RANGES: tuple[str, ...] = ("auto", "full", "reduced")
WEIGHT_RANGE_HELP = ("int8 weight integers: 'full' (-127..127), 'reduced' (-63..63, exact on x86 CPUs without VNNI, "
                     "whose uint8 x int8 instruction saturates), 'auto' (reduced where the compiling CPU saturates)")


def weight_levels(weight_range: str, unsigned_activations: bool = True) -> int:
    """The largest weight integer of ``weight_range`` (one of :data:`WEIGHT_RANGES`): 63 if reduced, else 127.

    ``auto`` reduces where the compiling CPU saturates uint8 x int8 products (:func:`u8s8_saturates`)
    and the activations are uint8.
    """
    if weight_range not in WEIGHT_RANGES:
        raise ValueError(weight_range)
    reduced = weight_range == "reduced" or (weight_range == "auto" and unsigned_activations and u8s8_saturates())
    return 63 if reduced else 127


def sample_channel_means(value: torch.Tensor, dim: int, squares: bool = False) -> torch.Tensor:
    """``[samples, channels]`` means of ``value`` over everything but the batch items and ``dim``, float64.

    The leading dimension holds the batch items (one sample each) unless it is the channel
    dimension itself, in which case the whole tensor is one sample. With ``squares``:
    ``[2, samples, channels]``, the means and the means of the squares.
    """
    moved = value.detach().movedim(dim, -1)
    samples = moved.shape[0] if dim != 0 and moved.dim() > 1 else 1
    flat = moved.reshape(samples, -1, moved.shape[-1]).float()
    means = flat.mean(1).double()
    return torch.stack([means, flat.square().mean(1).double()]) if squares else means


def float_stats_key(graph_module: fx.GraphModule) -> tuple[int, dict[str, Any]]:
    """What float statistics recorded on ``graph_module``'s nodes depend on, to tell later whether they still hold.

    The number of computing nodes (quantize-int8's fake-quant aside: the float model bypasses them)
    and a weak reference to every constant tensor the graph reads: a pass that changes a weight
    makes a new tensor (docs/design.md, invariant 11), so a changed weight or op makes the key stale.
    Check with :func:`float_stats_hold`.
    """
    import weakref

    from fxcompress.graph_meta import QUANT_META

    count = 0
    tensors: dict[str, Any] = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            value = _attribute(graph_module, str(node.target))
            if isinstance(value, torch.Tensor):
                tensors[str(node.target)] = weakref.ref(value)
        elif node.op in ("call_function", "call_method", "call_module"):
            if node.meta.get(QUANT_META, {}).get("role") not in ("activation", "weight"):
                count += 1
    return count, tensors


def float_stats_hold(key: tuple[int, dict[str, Any]], graph_module: fx.GraphModule) -> bool:
    """Whether statistics recorded under ``key`` (:func:`float_stats_key`) still describe ``graph_module``'s float model."""
    count, tensors = key
    now_count, now = float_stats_key(graph_module)
    if now_count != count:
        return False
    return all(name in now and ref() is not None and ref() is now[name]() for name, ref in tensors.items())


def _attribute(module: torch.nn.Module, target: str) -> Any:
    owner: Any = module
    for part in target.split("."):
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner
