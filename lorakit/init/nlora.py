"""NLoRA (Guo et al., 2025; METHODS.md entry 24): Nyström initialisation of the three-factor SLoRA update.

The Nyström sketch of ``W`` from its first ``r`` columns ``C = W[:, :r]`` and rows ``R = W[:r, :]`` is

    W ≈ C W_IJ^+ R,     W_IJ = W[:r, :r]

and NLoRA starts ``B = C``, ``M = W_IJ^+ / s``, ``A = R`` (so ``s B M A`` is the sketch). When ``rank(W) = r`` and
``W_IJ`` is invertible the sketch is exact. The official code drops the pseudo-inverse (``M = W_IJ``) and does not
compensate the base; lorakit uses the textbook sketch and compensates (``W_res = W - s B M A``) so the adapted
model starts equal to the base model. With a LoRA-XS config (only ``M`` trained) this is the paper's IntTune.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .linalg import check_rank
from .registry import Factors, register_init


def nystrom(w: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(C, W_IJ^+, R)``: ``(rows, r)``, ``(r, r)``, ``(r, cols)`` with ``C W_IJ^+ R`` the Nyström sketch of ``w``."""
    return w[:, :r], torch.linalg.pinv(w[:r, :r]), w[:r, :]


@register_init("nlora", form="BMA")
def nlora(w: Tensor, r: int, scale: float) -> Factors:
    """NLoRA factors of ``w`` (``(rows, cols)``, float32), base compensated."""
    check_rank("nlora", r, w)
    c, core, rows = nystrom(w, r)
    return Factors(b=c.clone(), m=core / scale, a=rows.clone(), compensate=True)
