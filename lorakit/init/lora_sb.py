"""LoRA-SB (Ponkshe et al., 2024; METHODS.md entry 23): start LoRA-XS at the best rank-r first update.

The first full-fine-tuning update is approximated from the mean gradient ``G`` of the given batches,

    dW = -lr * sign(G)      (the authors' code: an Adam-like first step; ``update="sign"``)
    dW = -lr * G            (plain SGD; ``update="sgd"``)

and with ``dW ≈ U_r S_r V_r^T`` (truncated SVD) the three-factor adapter ``s B R A`` starts at

    B = U_r (frozen),   A = V_r^T (frozen),   R = S_r / s (trainable),

i.e. ``s B R A`` is the best rank-``r`` approximation of ``dW`` (Eckart–Young). The base is *not* compensated:
with ``B`` and ``A`` frozen, ``R``'s starting value only matters through the model it starts from, which is the
base model plus the approximated first update. Gradients then are ``dL/dR = s B^T G A^T``, the projected full
gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import require
from .linalg import check_rank, top_svd
from .registry import Factors, LayerInfo, register_init


@register_init("lora-sb", form="BMA", statistic="gradient", options={"lr": 1e-3, "update": "sign", "niter": None})
def lora_sb(grad: Tensor, layer: LayerInfo, lr: float = 1e-3, update: str = "sign",
            niter: int | None = None) -> Factors:
    """Three factors from the mean full-weight gradient ``grad`` (``(rows, cols)``) of one layer."""
    require(update in ("sign", "sgd"), "init_options['update']", update, "must be 'sign' or 'sgd'")
    check_rank("lora-sb", layer.r, grad)
    step = -lr * (torch.sign(grad) if update == "sign" else grad)  # (rows, cols)
    u, s, vh = top_svd(step, layer.r, niter=niter)  # (rows, r), (r,), (r, cols)
    return Factors(b=u, m=torch.diag(s) / layer.scale, a=vh)
