"""Client-level differential privacy (DP-FedAvg, McMahan et al., 2018) for aggregators that average the uploads.

Each client's update ``u_k - g`` (its uploaded tensors minus the global ones, all layers jointly) is clipped to norm
``C``; the clipped uploads are averaged with equal weights, and Gaussian noise ``N(0, sigma^2 C^2 / K^2)`` joins the
average. The noise is added to one clipped upload as ``N(0, sigma^2 C^2)`` before the aggregator's uniform mean,
which is the same distribution on the mean; what the aggregator does after the mean (FedSVD's re-basis) is
post-processing and keeps the guarantee. An aggregator that uses the individual updates themselves (FLoRA's
stacking, LoRA-FAIR's correction from ``sum_k p_k B_k A_k``) would release them unclipped and unnoised, so it is
refused. Flower's ``DifferentialPrivacyServerSideFixedClipping`` wrapper does the same on a strategy's flat arrays;
it cannot wrap lorakit's strategy, whose global state lives in the server (roles, merged updates), not in the arrays
Flower passes between rounds.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

Layers = Mapping[str, Mapping[str, Tensor]]


def update_norm(upload: Layers, reference: Layers) -> float:
    """``||upload - reference||`` over every tensor of every layer."""
    return math.sqrt(sum(float(((t.float() - reference[p][r].float()) ** 2).sum())
                         for p, roles in upload.items() for r, t in roles.items()))


def clip_update(upload: Layers, reference: Layers, clip: float) -> dict[str, dict[str, Tensor]]:
    """``reference + (upload - reference) * min(1, clip / ||upload - reference||)``."""
    factor = min(1.0, clip / max(update_norm(upload, reference), 1e-12))
    return {p: {r: reference[p][r] + (t - reference[p][r]) * factor for r, t in roles.items()}
            for p, roles in upload.items()}


def privatise(uploads: Sequence[Layers], reference: Layers, clip: float, sigma: float,
              generator: torch.Generator | None = None) -> list[dict[str, dict[str, Tensor]]]:
    """The uploads clipped to ``clip``, the first with ``N(0, (sigma * clip)^2)`` added (see the module docstring);
    average them with equal weights."""
    clipped = [clip_update(u, reference, clip) for u in uploads]
    first = clipped[0]
    for roles in first.values():
        for role, t in roles.items():
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32, device=t.device)
            roles[role] = t + (sigma * clip * noise).to(t.dtype)
    return clipped
