"""Block-wise weight quantization arithmetic: grids, codes, the fake-quantized weight, GPTQ.

A weight ``W [N, K]`` is cut along ``K`` into blocks of ``block_size`` values (the last block
zero-padded), each with a scale and an unsigned zero point; codes are ``0 .. 2**bits - 1``, the
layout ORT's MatMulNBits and GatherBlockQuantized read. Everything here is plain tensor math on
one weight: :mod:`fxcompress.passes.quantize_weights` puts it in graphs, and
:mod:`fxcompress.export.nbits` packs :func:`block_codes` into the ONNX file, so PyTorch and the
file round the same way.
"""

from __future__ import annotations

import math

import torch


def _blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """``weight [N, K]`` as ``[N, ceil(K / block_size), block_size]``, the last block zero-padded."""
    rows, cols = weight.shape
    pad = -cols % block_size
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(rows, -1, block_size)


def block_grid(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(scale [N, n_blocks] float32, zero_point [N, n_blocks] uint8)`` of ``weight [N, K]``.

    Codes are unsigned ``0 .. 2**bits - 1`` as MatMulNBits stores them. Asymmetric: the block's
    range (extended to include 0, so zero stays exact) spread over all levels. Symmetric: the zero
    point is ``2**(bits-1)`` (MatMulNBits' default, so none is stored) and the scale covers the
    larger side: ``2**(bits-1) - 1`` levels above zero, ``2**(bits-1)`` below.
    """
    blocks = _blocks(weight.detach().float(), block_size)
    lo = blocks.amin(dim=-1).clamp(max=0.0)
    hi = blocks.amax(dim=-1).clamp(min=0.0)
    qmax = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        scale = torch.maximum(hi / (qmax - mid), -lo / mid)
        zero = torch.full_like(scale, mid)
    else:
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: any scale is exact
    return scale.float(), zero.clamp(0, qmax).to(torch.uint8)


def block_codes(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                block_size: int) -> torch.Tensor:
    """The integer codes ``clamp(round(w / scale) + zero_point, 0, 2**bits - 1)`` of ``weight [N, K]``,
    as float ``[N, n_blocks, block_size]`` (padding included; round half to even)."""
    blocks = _blocks(weight.float(), block_size)
    codes = torch.round(blocks / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1).float()
    return codes.clamp(0, 2**bits - 1)


def block_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, columns: int) -> torch.Tensor:
    """``(codes - zero_point) * scale`` back as ``[N, columns]`` (the padding dropped)."""
    values = (codes - zero_point.unsqueeze(-1).float()) * scale.unsqueeze(-1)
    return values.reshape(values.shape[0], -1)[:, :columns]


def fake_quantize_blocks(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                         block_size: int) -> torch.Tensor:
    """``weight`` rounded to its block grid, with a straight-through gradient (QAT).

    The gradient passes unchanged, also for weights that training moves beyond their block's
    range (clipped there): the grids are fixed, so a clipped STE would freeze such weights for good.
    """
    codes = block_codes(weight.detach(), scale, zero_point, bits, block_size)
    rounded = block_dequantize(codes, scale, zero_point, weight.shape[1]).to(weight.dtype)
    return weight + (rounded - weight).detach()



# --- GPTQ ---------------------------------------------------------------------------------------

def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, symmetric: bool,
         damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``weight [N, K]`` given ``hessian = X^T X [K, K]`` of its inputs.

    Returns ``(dequantized weight, scale, zero_point)``: the weight holds grid values exactly, so
    :func:`block_codes` of it gives back GPTQ's codes. Input channels never active on the data
    (zero Hessian diagonal) are zeroed; ``damp`` (a fraction of the mean diagonal) keeps the
    inverse well conditioned.
    """
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_factor(h, damp)
    n_blocks = -(-cols // block_size)
    scale = torch.ones(rows, n_blocks, dtype=torch.float32)
    zero = torch.zeros(rows, n_blocks, dtype=torch.uint8)
    out = torch.zeros_like(w)
    lazy = block_size * max(1, 128 // block_size)  # columns updated together; whole blocks, so a grid sees its block updated
    for start in range(0, cols, lazy):
        end = min(start + lazy, cols)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        inv = hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = column // block_size
            if column % block_size == 0:
                s, z = block_grid(chunk[:, i:i + block_size], bits, block_size, symmetric)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            q = torch.clamp(torch.round(chunk[:, i].float() / scale[:, g]) + zero[:, g].float(), 0, 2**bits - 1)
            value = ((q - zero[:, g].float()) * scale[:, g]).double()
            out[:, column] = value
            err = (chunk[:, i] - value) / inv[i, i]
            chunk[:, i:] -= err.unsqueeze(1) * inv[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return out.to(weight.dtype), scale, zero



def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``: row i holds how column i's
    rounding error moves the later columns. A Hessian too ill-conditioned to factor (inputs
    nearly collinear on little data) gets 10x more damping, up to five times."""
    eye = torch.eye(h.shape[0], dtype=h.dtype) * torch.diagonal(h).mean()
    for attempt in range(6):
        try:
            factor = torch.linalg.cholesky(h + eye * max(damp, 1e-6) * 10**attempt)
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the input Hessian cannot be factored even with 1e5x the damping")


def packed_bytes(rows: int, cols: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of a block-quantized ``[rows, cols]`` table: codes, float32 scales, packed zero points."""
    n_blocks = -(-cols // block_size)
    zero_points = 0 if symmetric else rows * math.ceil(n_blocks * bits / 8)
    return rows * n_blocks * block_size * bits // 8 + rows * n_blocks * 4 + zero_points


__all__ = ["block_codes", "block_dequantize", "block_grid", "fake_quantize_blocks", "gptq", "packed_bytes"]
