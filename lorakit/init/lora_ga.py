"""LoRA-GA (Wang et al., 2024; METHODS.md entry 21): align the first LoRA step with the full-gradient step.

With ``G = dL/dW`` averaged over the given batches and ``G = U S V^T`` (direction "ArB2r", "stable" scale):

    A = c V[:, :r]^T,   B = c U[:, r:2r],   c = d_out^{1/4} / sqrt(gamma),   W_res = W - s B A

One SGD step of size ``eta`` on ``A`` and ``B`` then moves the effective weight by (first order in ``eta``)

    -eta s^2 (B B^T G + G A^T A) = -eta s^2 c^2 (U_{r:2r} U_{r:2r}^T G + G V_r V_r^T) = -eta s^2 c^2 SVD_2r(G),

the full-fine-tuning step projected on ``G``'s best rank-``2r`` approximation (the paper's Theorem 3.1). PEFT's
``LoraGAConfig`` also multiplies ``B`` by the singular values and scales only ``B``; lorakit follows the paper.
"""
from __future__ import annotations

from torch import Tensor

from .linalg import check_rank, top_svd
from .registry import Factors, LayerInfo, register_init


@register_init("lora-ga", statistic="gradient", options={"gamma": 16.0, "niter": 4})
def lora_ga(grad: Tensor, layer: LayerInfo, gamma: float = 16.0, niter: int | None = 4) -> Factors:
    """Factors from the mean full-weight gradient ``grad`` (``(rows, cols)``) of one layer."""
    r = layer.r
    check_rank("lora-ga", r, grad, needed=2 * r)
    u, _, vh = top_svd(grad, 2 * r, niter=niter)  # (rows, 2r), (2r, cols)
    c = layer.rows**0.25 / gamma**0.5
    return Factors(b=c * u[:, r : 2 * r], a=c * vh[:r], compensate=True)
