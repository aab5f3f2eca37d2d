"""OLoRA (Büyükakyüz, 2024): orthonormal factors from the QR decomposition of the weight, as in PEFT.

    W = Q R,   B = Q[:, :r],   A = R[:r, :],   W_res = W - s B A

``B`` has orthonormal columns; the base is compensated so the adapted layer starts equal to the base layer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .linalg import check_rank
from .registry import Factors, register_init


@register_init("olora")
def olora(w: Tensor, r: int, scale: float) -> Factors:
    """Factors of ``w`` (``(rows, cols)``, float32) from its reduced QR decomposition."""
    check_rank("olora", r, w)
    q, rr = torch.linalg.qr(w)  # (rows, k), (k, cols)
    return Factors(b=q[:, :r], a=rr[:r], compensate=True)
