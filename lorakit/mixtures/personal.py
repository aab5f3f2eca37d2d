"""RecLoRA's Personalized LoRA (Zhu et al., 2024): a bank of meta-LoRAs mixed per sample with soft weights computed
from a user representation.

    bank = add_bank(model, lorakit.LoraConfig(r=8, targets=[...]), 4)                 # meta_0 .. meta_3
    router = lorakit.add_router(model, "users", UserRouter(4, user_dim=64))          # trains and saves with the model
    with personalize(model, bank, router, user_vectors):                             # user_vectors: (B, 64)
        out = model(input_ids)     # row b, every layer: W x + sum_i w_{b,i} B_i A_i x,  w_b = softmax(U u_b / tau)

Equation: ``w_b = softmax((U u_b + c) / tau)`` over the ``n`` meta-LoRAs, with ``u_b`` row ``b``'s user vector; each
layer then computes ``W x + sum_i w_{b,i} dW_i x`` for the tokens of row ``b`` (per-row weights of
:func:`lorakit.mix`), i.e. each user gets the LoRA ``sum_i w_{b,i} dW_i`` without one being stored per user.

What the abstract leaves open, and what is assumed here:

* The user representation comes from a conventional recommender (the paper's "lens"); here it is any ``(B, user_dim)``
  float tensor given with the batch, computed outside (and detached or not, as the caller likes).
* The router is one linear map with a bias, a softmax and a fixed temperature; the weights are the same at every
  layer (one routing decision per sample, not per layer or token).
* The Long-Short Modality Retriever and Few2Many learning are data-side and not part of this module.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..inject import adapt
from ..mixing import mix
from ..routing.routers import ROUTER_KINDS
from ..routing.weighted import WeightedRouting


@ROUTER_KINDS.decorator("user")
class UserRouter(nn.Module):
    """``softmax((U u + c) / temperature)``: ``(B, user_dim)`` user vectors -> ``(B, n)`` meta-LoRA weights.

    Zero-initialised, so every user starts from the uniform mixture. Register it with :func:`lorakit.add_router`
    so that it trains and saves (kind ``"user"``) with the model; it is not a per-layer router: give its weights to
    :func:`lorakit.mix` (or use :func:`personalize`), not the router itself."""

    kind = "user"

    def __init__(self, n: int, user_dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        require(isinstance(n, int) and n >= 1, "n", n, "must be a positive integer (meta-LoRAs in the bank)")
        require(isinstance(user_dim, int) and user_dim >= 1, "user_dim", user_dim, "must be a positive integer")
        require(isinstance(temperature, (int, float)) and temperature > 0, "temperature", temperature, "must be > 0")
        self.n, self.user_dim, self.temperature = n, user_dim, float(temperature)
        self.proj = nn.Linear(user_dim, n)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def config(self) -> dict[str, Any]:
        """What rebuilds this router (saved beside its tensors)."""
        return {"n": self.n, "user_dim": self.user_dim, "temperature": self.temperature}

    def forward(self, users: Tensor) -> Tensor:
        if not isinstance(users, Tensor) or users.dim() != 2 or users.shape[1] != self.user_dim \
                or not users.is_floating_point():
            got = (tuple(users.shape), str(users.dtype)) if isinstance(users, Tensor) else type(users).__name__
            raise LorakitError(f"users must be a float tensor (batch, user_dim={self.user_dim}), one user vector per "
                               f"row of the batch; got {got}")
        logits = self.proj(users.to(self.proj.weight.dtype))
        return F.softmax(logits / self.temperature, dim=-1)


def add_bank(model: nn.Module, config: AdapterConfig, n: int, prefix: str = "meta") -> list[str]:
    """Add ``n`` meta-LoRAs ``<prefix>_0 .. <prefix>_{n-1}`` (``config``, not active); returns their names."""
    require(isinstance(n, int) and n >= 1, "n", n, "must be a positive integer")
    names = [f"{prefix}_{i}" for i in range(n)]
    for name in names:
        adapt(model, config, name, activate=False)
    return names


@contextlib.contextmanager
def personalize(model: nn.Module, names: Sequence[str], router: UserRouter, users: Tensor,
                dispatch: str = "sparse") -> Iterator[WeightedRouting]:
    """Within the block, row ``b`` computes ``W x + sum_i router(users)[b, i] dW_{names[i]} x`` at every layer; the
    router's gradient flows through the weights. ``users``: ``(B, user_dim)``, ``B`` the batch's rows."""
    require(isinstance(router, UserRouter), "router", type(router).__name__, "must be a UserRouter")
    require(len(names) == router.n, "names", list(names), f"must name the router's {router.n} meta-LoRAs in order")
    with mix(model, names, router(users), dispatch) as routing:
        yield routing
