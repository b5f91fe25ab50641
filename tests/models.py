"""Tiny synthetic models for unit tests (fast on 2 CPU cores).

Batch-norm statistics are randomised so folding and pruning are exercised on non-trivial values.
"""

from __future__ import annotations

import torch
from torch import nn


# Beyond this machine (24 GiB, 2 cores): over 2 GiB of fp32 weights, which is also past protobuf's
# 2 GiB limit for a single-file ONNX model, and the pipeline holds several copies of the model.
TOO_BIG = {
    "vit_h_14": "632M parameters (2.5 GiB fp32): past the 2 GiB single-file ONNX limit and too slow on 2 cores",
    "regnet_y_128gf": "644M parameters (2.6 GiB fp32): past the 2 GiB single-file ONNX limit and too slow on 2 cores",
}


def _set_batch_norms(model: nn.Module, seed: int, spread_var, spread_gain) -> nn.Module:
    """Every batch norm's running stats and affine parameters from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(spread_var(n, g))
                if m.affine:
                    m.weight.copy_(spread_gain(n, g))
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial running stats and affine parameters."""
    within_25_percent = lambda n, g: torch.rand(n, generator=g) * 0.5 + 0.75  # noqa: E731
    return _set_batch_norms(model, seed, within_25_percent, within_25_percent)


def uneven_bn(model: nn.Module, seed: int = 0, spread: float = 0.5) -> nn.Module:
    """Batch norms with per-channel gains spread over orders of magnitude (log-normal, ``spread``).

    Trained depthwise networks fold into per-channel ranges far less even than
    :func:`randomize_bn`'s (gains within 25%): a stress case for per-tensor int8 activations.
    """
    log_normal = lambda n, g: torch.exp(torch.randn(n, generator=g) * spread)  # noqa: E731
    return _set_batch_norms(model, seed, log_normal, log_normal)


class ConvBnRelu(nn.Module):
    """conv -> bn -> relu -> pool -> linear: the smallest classifier with a foldable BN."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


class WithNoOps(nn.Module):
    """Eval dropout, identity, same-shape reshape and a same-dtype cast around a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.ident(x))
        y = y.reshape(y.shape).to(torch.float32).contiguous()
        return self.fc(y)


class Residual(nn.Module):
    """Two conv-bn blocks with a residual add and in-place relus (as torchvision writes them)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = self.relu(y + x)
        return self.fc(y.mean((2, 3)))


class TwoInputs(nn.Module):
    """Token ids plus a float feature: several inputs of different dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8 + 4, 3)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.emb(ids).mean(1), feats], dim=1))


class TupleOutput(nn.Module):
    """Returns a (logits, features) tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.body(x))
        return self.head(h), h


class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def conv_bn_relu() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Factory used by CLI tests (``tests.models:conv_bn_relu``)."""
    torch.manual_seed(0)
    return randomize_bn(ConvBnRelu()).eval(), (torch.randn(1, 3, 16, 16),)


class KeywordModel(nn.Module):
    """Called as model(input_ids=..., attention_mask=...) and returns a dict, like a HF encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.proj(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return {"last_hidden_state": hidden, "pooled": pooled}


def keyword_encoder():
    """CLI spec ``tests.models:keyword_encoder``: the model and a tokenizer-style dict of inputs."""
    torch.manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return KeywordModel().eval(), {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": mask}


class LinearChain(nn.Module):
    """Linear layers of ``widths`` in a row (a ReLU after the first with ``act``): fuse-linear-chains' case."""

    def __init__(self, *widths: int, act: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))
        self.act = act

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.act and i == 0:
                x = torch.relu(x)
        return x
