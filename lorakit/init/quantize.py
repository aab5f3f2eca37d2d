"""A simple blockwise fake quantiser for LoftQ: quantise, then dequantise back to float.

lorakit has no quantised base backend yet, so LoftQ stores the *dequantised* weight ``Q(W)`` in the dense backend:
the numerics (and the error LoftQ minimises) are those of the quantised model, the memory is not. Two codebooks:

* ``"nf4"``: QLoRA's 4-bit NormalFloat levels (quantiles of N(0, 1) scaled to [-1, 1], exact zero);
* ``"uniform"``: ``2**bits`` evenly spaced levels in [-1, 1].

Each block of ``block`` consecutive values (row-major) is scaled by its absolute maximum (QLoRA's absmax).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import require

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def levels(kind: str, bits: int) -> Tensor:
    """The codebook in [-1, 1]."""
    require(kind in ("nf4", "uniform"), "kind", kind, "must be 'nf4' or 'uniform'")
    if kind == "nf4":
        require(bits == 4, "bits", bits, "must be 4 for the nf4 codebook")
        return torch.tensor(NF4_LEVELS)
    require(1 <= bits <= 8, "bits", bits, "must be in [1, 8]")
    return torch.linspace(-1.0, 1.0, 2**bits)


def fake_quantize(w: Tensor, kind: str = "nf4", bits: int = 4, block: int = 64) -> Tensor:
    """``dequantize(quantize(w))``: every value replaced by the nearest codebook level times its block's absmax."""
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (n_blocks, 1)
    code = levels(kind, bits).to(w.device)  # (n_levels,)
    idx = (blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(dim=-1)  # (n_blocks, block)
    out = code[idx] * absmax
    return out.reshape(-1)[: flat.numel()].reshape(w.shape)
