"""A grammar of small, valid PyTorch models for property-based (differential) testing.

``model_specs()`` is a hypothesis strategy that draws a :class:`ModelSpec`: an input shape and a
short list of layers, each chosen among those that fit the current tensor shape, so every drawn
model runs. ``build_model(spec)`` turns a spec into an ``nn.Module`` and example inputs,
deterministically (weights and inputs come from ``spec.seed``).

A spec's ``repr`` is valid Python, so a failing case that hypothesis shrank can be pasted into
``test_regressions.py`` as it is.

Tensor states the grammar tracks:
    image  (N, C, H, W)  conv, batch norm, pooling, residual blocks, concat, H<->W transpose
    seq    (N, L, D)     linear, layer norm, attention (nn.MultiheadAttention or hand-written)
    flat   (N, F)        linear, batch norm 1d, MLP residuals, linear chains, reshape round trips
and layers usable in every state: activations, no-ops (eval dropout, identity, same-shape reshape,
same-dtype cast, clone), affine scalings (including x*1, x+0 and x*0, which algebraic passes
target) and duplicated subexpressions (which CSE targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "hardswish", "sigmoid")
#: Activations that have an in-place module form (as torchvision writes them).
_INPLACE_OK = {"relu", "relu6", "silu", "hardswish"}

# Size caps keep every generated model tiny: the point is graph shapes, not arithmetic volume.
MAX_CHANNELS = 12
MAX_FEATURES = 64
MAX_LAYERS = 6


@dataclass(frozen=True)
class ModelSpec:
    """A generated model: input shape, layers ``(op, params)`` in order, output form, seed.

    ``output`` is "tensor", "tuple" (final, middle) or "dict" {"out": final, "mid": middle},
    where "middle" is the output of layer ``len(layers) // 2``.
    """

    input_shape: tuple[int, ...]
    layers: tuple[tuple[str, dict[str, Any]], ...]
    output: str = "tensor"
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Layer modules. Each takes the current tensor and returns the next; shapes are checked by the
# grammar, so the modules themselves stay plain.


def activation(kind: str, inplace: bool = False) -> nn.Module:
    """The nn module for an activation name (``gelu-tanh`` is GELU with the tanh approximation)."""
    inplace = inplace and kind in _INPLACE_OK
    return {
        "relu": lambda: nn.ReLU(inplace=inplace),
        "relu6": lambda: nn.ReLU6(inplace=inplace),
        "gelu": lambda: nn.GELU(),
        "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": lambda: nn.SiLU(inplace=inplace),
        "hardswish": lambda: nn.Hardswish(inplace=inplace),
        "sigmoid": lambda: nn.Sigmoid(),
    }[kind]()


class ConvBlock(nn.Module):
    """conv, optionally followed by batch norm and an activation (the fold/fuse patterns)."""

    def __init__(self, cin, out, k, stride, padding, groups, dilation, bias, bn, act, inplace):
        super().__init__()
        self.conv = nn.Conv2d(cin, out, k, stride=stride, padding=padding, groups=groups, dilation=dilation, bias=bias)
        self.bn = nn.BatchNorm2d(out, affine=bn == "affine") if bn else nn.Identity()
        self.act = activation(act, inplace) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ConvResidual(nn.Module):
    """x + bn(conv(act(x))) (or its in-place form ``y += x``), channels and size preserved."""

    def __init__(self, c, k, groups, act, inplace_add):
        super().__init__()
        self.act = activation(act)
        self.conv = nn.Conv2d(c, c, k, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.inplace_add = inplace_add

    def forward(self, x):
        y = self.bn(self.conv(self.act(x)))
        if self.inplace_add:
            y += x
            return y
        return x + y


class Concat(nn.Module):
    """Parallel 1x1/3x3 conv branches concatenated on channels (an inception-style split)."""

    def __init__(self, cin, outs, kernels):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(cin, o, k, padding=k // 2) for o, k in zip(outs, kernels))

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class Pool(nn.Module):
    def __init__(self, kind, k, stride):
        super().__init__()
        self.pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[kind](k, stride) if kind != "adaptive" else nn.AdaptiveAvgPool2d(k)

    def forward(self, x):
        return self.pool(x)


class Linear(nn.Module):
    """linear, optionally followed by an activation (on the last dimension, any rank)."""

    def __init__(self, fin, out, bias, act):
        super().__init__()
        self.fc = nn.Linear(fin, out, bias=bias)
        self.act = activation(act) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.fc(x))


class LinearChain(nn.Module):
    """Two linears with nothing between them (what fuse-linear-chains collapses)."""

    def __init__(self, fin, mid, out, bias):
        super().__init__()
        self.a = nn.Linear(fin, mid, bias=bias)
        self.b = nn.Linear(mid, out)

    def forward(self, x):
        return self.b(self.a(x))


class MlpResidual(nn.Module):
    """x + fc2(act(fc1(x))) on the last dimension."""

    def __init__(self, d, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class TorchAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention (batch_first), plus the residual."""

    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return x + self.attn(x, x, x, need_weights=False)[0]


class HandAttention(nn.Module):
    """Self-attention written out: q/k/v projections, scaled softmax(q k^T) v, output projection."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
        return self.out(y)


class Reshape(nn.Module):
    """Pure shape changes: ``kind`` names which."""

    def __init__(self, kind, arg=None):
        super().__init__()
        self.kind, self.arg = kind, arg

    def forward(self, x):
        if self.kind == "transpose_hw":
            return x.transpose(2, 3)
        if self.kind == "transpose_seq":
            return x.transpose(1, 2).contiguous()
        if self.kind == "to_seq":  # (N, C, H, W) -> (N, H*W, C), the ViT patch layout
            return x.flatten(2).transpose(1, 2)
        if self.kind == "flatten":
            return torch.flatten(x, 1)
        if self.kind == "mean":  # global average over spatial/sequence dims
            return x.mean(self.arg)
        if self.kind == "roundtrip":  # (N, F) -> (N, a, F/a) -> (N, F)
            n, f = x.shape
            return x.reshape(n, self.arg, f // self.arg).reshape(n, f)
        raise ValueError(self.kind)


class NoOp(nn.Module):
    """Something that computes nothing: what remove-no-ops removes."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if self.kind == "dropout":
            return self.drop(x)
        if self.kind == "reshape":
            return x.reshape(x.shape)
        if self.kind == "cast":
            return x.to(torch.float32)
        if self.kind == "clone":
            return x.clone()
        if self.kind == "contiguous":
            return x.contiguous()
        return x  # identity


class Scale(nn.Module):
    """x * mul + add with scalar constants (1.0 and 0.0 included: algebraic identities)."""

    def __init__(self, mul, add):
        super().__init__()
        self.mul, self.add = mul, add

    def forward(self, x):
        return x * self.mul + self.add


class Duplicate(nn.Module):
    """act(x) computed twice and summed: a common subexpression."""

    def __init__(self, act):
        super().__init__()
        self.kind = act

    def forward(self, x):
        fn = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish,
              "sigmoid": torch.sigmoid}[self.kind]
        return fn(x) + fn(x)


class ZeroBranch(nn.Module):
    """x + 0 * f(x): a branch whose contribution is provably zero for finite f(x)."""

    def __init__(self, act):
        super().__init__()
        self.act = activation(act)

    def forward(self, x):
        return x + 0.0 * self.act(x)


def make_layer(op: str, p: dict[str, Any], shape: tuple[int, ...]) -> nn.Module:
    """The module for layer ``op`` with params ``p`` applied to a tensor of ``shape``."""
    if op == "conv":
        return ConvBlock(shape[1], p["out"], p["k"], p["stride"], p["padding"], p["groups"], p["dilation"],
                         p["bias"], p["bn"], p["act"], p["inplace"])
    if op == "bn2d":
        return nn.BatchNorm2d(shape[1], affine=p["affine"])
    if op == "conv_residual":
        return ConvResidual(shape[1], p["k"], p["groups"], p["act"], p["inplace_add"])
    if op == "concat":
        return Concat(shape[1], p["outs"], p["kernels"])
    if op == "pool":
        return Pool(p["kind"], p["k"], p["stride"])
    if op == "linear":
        return Linear(shape[-1], p["out"], p["bias"], p["act"])
    if op == "linear_chain":
        return LinearChain(shape[-1], p["mid"], p["out"], p["bias"])
    if op == "bn1d":
        return nn.BatchNorm1d(shape[1], affine=p["affine"])
    if op == "layernorm":
        return nn.LayerNorm(shape[-1])
    if op == "mlp_residual":
        return MlpResidual(shape[-1], p["hidden"], p["act"])
    if op == "attention":
        cls = TorchAttention if p["impl"] == "torch" else HandAttention
        return cls(shape[-1], p["heads"])
    if op == "reshape":
        return Reshape(p["kind"], p.get("arg"))
    if op == "act":
        return activation(p["kind"], p["inplace"])
    if op == "noop":
        return NoOp(p["kind"])
    if op == "scale":
        return Scale(p["mul"], p["add"])
    if op == "duplicate":
        return Duplicate(p["act"])
    if op == "zero_branch":
        return ZeroBranch(p["act"])
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------------------------------------
# Shapes: what each layer turns the current shape into (None: the layer does not fit).


def _conv_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def out_shape(op: str, p: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of layer ``op`` on ``shape`` (the grammar only draws layers that fit)."""
    if op == "conv":
        n, _, h, w = shape
        size = [_conv_size(s, p["k"], p["stride"], p["padding"], p["dilation"]) for s in (h, w)]
        return (n, p["out"], *size)
    if op == "concat":
        return (shape[0], sum(p["outs"]), *shape[2:])
    if op == "pool":
        if p["kind"] == "adaptive":
            return (*shape[:2], p["k"], p["k"])
        return (*shape[:2], *[(s - p["k"]) // p["stride"] + 1 for s in shape[2:]])
    if op in ("linear", "linear_chain"):
        return (*shape[:-1], p["out"])
    if op == "reshape":
        kind = p["kind"]
        if kind == "transpose_hw":
            return (shape[0], shape[1], shape[3], shape[2])
        if kind == "transpose_seq":
            return (shape[0], shape[2], shape[1])
        if kind == "to_seq":
            return (shape[0], shape[2] * shape[3], shape[1])
        if kind == "flatten":
            return (shape[0], math.prod(shape[1:]))
        if kind == "mean":
            return tuple(s for i, s in enumerate(shape) if i not in p["arg"])
        return shape
    return shape  # everything else keeps the shape


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------
# The strategy.

_generic_layer = st.one_of(
    st.builds(lambda k, i: ("act", {"kind": k, "inplace": i}), st.sampled_from(ACTIVATIONS + ("gelu-tanh",)), st.booleans()),
    st.builds(lambda k: ("noop", {"kind": k}), st.sampled_from(["dropout", "identity", "reshape", "cast", "clone", "contiguous"])),
    st.builds(lambda m, a: ("scale", {"mul": m, "add": a}), st.sampled_from([1.0, 0.5, 2.0, -1.0, 0.0]), st.sampled_from([0.0, 0.25])),
    st.builds(lambda a: ("duplicate", {"act": a}), st.sampled_from(ACTIVATIONS)),
    st.builds(lambda a: ("zero_branch", {"act": a}), st.sampled_from(ACTIVATIONS)),
)


@st.composite
def _image_layer(draw, shape):
    n, c, h, w = shape
    choices = ["conv", "conv", "conv", "bn2d", "conv_residual", "concat", "pool", "reshape_hw", "generic", "generic", "leave"]
    pick = draw(st.sampled_from(choices))
    if pick == "conv":
        groups = draw(st.sampled_from(_divisors(c)))
        out = groups * draw(st.integers(1, max(1, MAX_CHANNELS // groups)))
        fits = [(k, s, pad, d) for k in (1, 2, 3, 5) for s in (1, 2) for pad in {0, k // 2} for d in (1, 2)
                if (k > 1 or d == 1) and min(_conv_size(x, k, s, pad, d) for x in (h, w)) >= 1]
        k, stride, padding, dilation = draw(st.sampled_from(fits))
        bn = draw(st.sampled_from([None, "affine", "plain"]))
        act = draw(st.sampled_from([None, *ACTIVATIONS]))
        return ("conv", {"out": out, "k": k, "stride": stride, "padding": padding, "groups": groups,
                         "dilation": dilation, "bias": draw(st.booleans()), "bn": bn, "act": act,
                         "inplace": draw(st.booleans())})
    if pick == "bn2d":
        return ("bn2d", {"affine": draw(st.booleans())})
    if pick == "conv_residual":
        return ("conv_residual", {"k": draw(st.sampled_from([1, 3])), "groups": draw(st.sampled_from(_divisors(c))),
                                  "act": draw(st.sampled_from(ACTIVATIONS)), "inplace_add": draw(st.booleans())})
    if pick == "concat":
        branches = draw(st.integers(2, 3))
        return ("concat", {"outs": [draw(st.integers(1, 4)) for _ in range(branches)],
                           "kernels": [draw(st.sampled_from([1, 3])) for _ in range(branches)]})
    if pick == "pool":
        kinds = ["adaptive"] + (["max", "avg"] if min(h, w) >= 2 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "adaptive":
            return ("pool", {"kind": kind, "k": draw(st.sampled_from([1, 2])), "stride": None})
        return ("pool", {"kind": kind, "k": 2, "stride": draw(st.sampled_from([1, 2]))})
    if pick == "reshape_hw":
        return ("reshape", {"kind": "transpose_hw"})
    if pick == "leave":  # leave the image state
        kinds = ["mean", "to_seq"] + (["flatten"] if c * h * w <= MAX_FEATURES else [])
        kind = draw(st.sampled_from(kinds))
        return ("reshape", {"kind": kind, "arg": (2, 3) if kind == "mean" else None})
    return draw(_generic_layer)


@st.composite
def _seq_layer(draw, shape):
    n, length, d = shape
    pick = draw(st.sampled_from(["linear", "linear", "layernorm", "attention", "mlp_residual", "transpose", "generic", "generic", "leave"]))
    if pick == "linear":
        return ("linear", {"out": draw(st.integers(1, 16)), "bias": draw(st.booleans()),
                           "act": draw(st.sampled_from([None, *ACTIVATIONS]))})
    if pick == "layernorm":
        return ("layernorm", {})
    if pick == "attention":
        heads = draw(st.sampled_from(_divisors(d)))
        return ("attention", {"impl": draw(st.sampled_from(["torch", "hand"])), "heads": heads})
    if pick == "mlp_residual":
        return ("mlp_residual", {"hidden": draw(st.integers(1, 16)), "act": draw(st.sampled_from(ACTIVATIONS))})
    if pick == "transpose":
        return ("reshape", {"kind": "transpose_seq"})
    if pick == "leave":
        kinds = ["mean"] + (["flatten"] if length * d <= MAX_FEATURES else [])
        kind = draw(st.sampled_from(kinds))
        return ("reshape", {"kind": kind, "arg": (1,) if kind == "mean" else None})
    return draw(_generic_layer)


@st.composite
def _flat_layer(draw, shape):
    n, f = shape
    pick = draw(st.sampled_from(["linear", "linear", "linear_chain", "bn1d", "mlp_residual", "roundtrip", "generic", "generic"]))
    if pick == "linear":
        return ("linear", {"out": draw(st.integers(1, 16)), "bias": draw(st.booleans()),
                           "act": draw(st.sampled_from([None, *ACTIVATIONS]))})
    if pick == "linear_chain":
        return ("linear_chain", {"mid": draw(st.integers(1, 16)), "out": draw(st.integers(1, 16)), "bias": draw(st.booleans())})
    if pick == "bn1d":
        return ("bn1d", {"affine": draw(st.booleans())})
    if pick == "mlp_residual":
        return ("mlp_residual", {"hidden": draw(st.integers(1, 16)), "act": draw(st.sampled_from(ACTIVATIONS))})
    if pick == "roundtrip" and f > 1:
        return ("reshape", {"kind": "roundtrip", "arg": draw(st.sampled_from(_divisors(f)))})
    return draw(_generic_layer)


def _state(shape: tuple[int, ...]) -> str:
    return {4: "image", 3: "seq", 2: "flat"}[len(shape)]


@st.composite
def model_specs(draw, max_layers: int = MAX_LAYERS) -> ModelSpec:
    """Draw a valid model: an input shape, then layers that fit the shape reached so far."""
    batch = draw(st.integers(1, 3))
    start = draw(st.sampled_from(["image", "image", "seq", "flat"]))
    if start == "image":
        shape = (batch, draw(st.integers(1, 4)), draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    elif start == "seq":
        shape = (batch, draw(st.integers(1, 6)), draw(st.sampled_from([2, 4, 6, 8])))
    else:
        shape = (batch, draw(st.integers(1, 16)))
    input_shape = shape
    layers = []
    for _ in range(draw(st.integers(1, max_layers))):
        state = _state(shape)
        layer = draw({"image": _image_layer, "seq": _seq_layer, "flat": _flat_layer}[state](shape))
        layers.append(layer)
        shape = out_shape(*layer, shape)
    output = draw(st.sampled_from(["tensor", "tensor", "tensor", "tuple", "dict"])) if len(layers) > 1 else "tensor"
    return ModelSpec(input_shape, tuple(layers), output, draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------------------------------------
# Building.


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running stats and affine parameters for every batch norm (eval-mode folding
    with mean 0 / var 1 / weight 1 would hide mistakes)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            k = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(k, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(k, generator=generator) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.randn(k, generator=generator))
                    m.bias.copy_(torch.randn(k, generator=generator) * 0.5)


class GeneratedModel(nn.Module):
    """Applies ``layers`` in order; returns the final tensor, or (final, middle) / a dict."""

    def __init__(self, layers: list[nn.Module], output: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output = output
        self.middle = len(layers) // 2

    def forward(self, x):
        middle = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == self.middle - 1:
                middle = x
        if self.output == "tuple":
            return x, middle
        if self.output == "dict":
            return {"out": x, "mid": middle}
        return x


def build_model(spec: ModelSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode model and example inputs for ``spec`` (deterministic in ``spec.seed``)."""
    torch.manual_seed(spec.seed)
    shape = tuple(spec.input_shape)
    layers = []
    for op, params in spec.layers:
        layers.append(make_layer(op, params, shape))
        shape = out_shape(op, params, shape)
    model = GeneratedModel(layers, spec.output)
    generator = torch.Generator().manual_seed(spec.seed)
    randomize_norms(model, generator)
    inputs = (torch.randn(spec.input_shape, generator=generator),)
    return model.eval(), inputs
