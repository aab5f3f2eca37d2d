"""PEGO (Hu et al., 2024; METHODS.md entry 19): a group of LoRAs on the same layers with an orthogonality
regulariser that keeps them apart from the pretrained weight and from each other::

    R = w_base · Σ_layers Σ_i ||A_i W0ᵀ||_F²  +  w_group · Σ_layers Σ_{i≠j} ||A_i A_jᵀ||_F²

``A_i`` is adapter ``i``'s down-projection on the layer (``A_eff`` of :meth:`~lorakit.methods.base.Adapter.factors`,
flattened), ``W0`` the layer's frozen weight (rows = output units). The group is several adapters active together
(``lorakit.set_active(model, names)`` sums their updates, so the merged model has the base's parameter count).
Assumed: squared Frobenius norms, summed (the paper gives the two terms; weights are hyper-parameters).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hooks import TrainingHook
from ..inject import hosts


def pego_penalty(model: nn.Module, names: Sequence[str], base_weight: float = 1.0,
                 group_weight: float = 1.0) -> Tensor:
    """The regulariser ``R`` over every layer holding any of ``names`` (factorable adapters on Linear/Conv)."""
    terms: list[Tensor] = []
    for host in hosts(model):
        downs = []
        for name in names:
            if name not in host.adapters:
                continue
            factors = host.adapters[name].factors()
            if factors is None or host.geometry.kind == "embedding":
                raise LorakitError(f"PEGO needs low-rank factors on Linear/Conv layers; adapter {name!r} on "
                                   f"{host.path!r} has none")
            downs.append(factors[1])  # (r, d_in_flat)
        if not downs:
            continue
        w0 = host.geometry.matrix(host.backend.weight()).detach().to(downs[0].dtype)  # (d_out, d_in_flat)
        for i, a in enumerate(downs):
            terms.append(base_weight * (a @ w0.t()).pow(2).sum())
            for j, other in enumerate(downs):
                if i != j:
                    terms.append(group_weight * (a @ other.t()).pow(2).sum())
    if not terms:
        raise LorakitError(f"PEGO: no layer holds any of the adapters {list(names)}")
    return torch.stack(terms).sum()


class PegoHook(TrainingHook):
    """Adds :func:`pego_penalty` to the loss once per step."""

    def __init__(self, names: Sequence[str], base_weight: float = 1e-3, group_weight: float = 1e-3) -> None:
        require(len(names) >= 1, "names", names, "must name at least one adapter")
        require(base_weight >= 0 and group_weight >= 0, "base_weight/group_weight", (base_weight, group_weight),
                "must be >= 0")
        self.names, self.base_weight, self.group_weight = list(names), base_weight, group_weight

    def regulariser(self, model: nn.Module) -> Tensor:
        return pego_penalty(model, self.names, self.base_weight, self.group_weight)
