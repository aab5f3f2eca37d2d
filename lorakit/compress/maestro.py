"""Maestro (Horváth et al., 2023; METHODS.md entry 72): trainable low-rank layers ordered by ordered dropout.

A Linear layer is replaced by a trainable factorisation ``W ≈ U V`` with ``U`` ``(d_out, r)`` and ``V``
``(r, d_in)`` (trained from scratch, or initialised from the layer's SVD ``W = P S Q^T`` as ``U = P √S``,
``V = √S Q^T``). Each training step samples, per layer, a rank ``b ~ p`` over ``{1, ..., r}`` (uniform) and the
layer computes with its first ``b`` components only (ordered dropout)::

    y = U[:, :b] V[:b] x + bias

so the expected loss ``E_b L(U_{:, :b} V_{:b})`` puts the most information in the leading components (for a linear
map on isotropic inputs its optimum is the truncated SVD, in order). The hierarchical group lasso over the nested
tails of the components::

    R(U, V) = λ Σ_layers Σ_{b=1}^{r} ( ||U[:, b-1:]||_F + ||V[b-1:]||_F )

penalises component ``j`` in ``j`` groups, so trailing ranks shrink first. After training,
:meth:`MaestroLinear.truncate` keeps the first ``k`` components (``k (d_in + d_out)`` factor parameters).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import require
from ..hooks import TrainingHook

MAESTRO_INITS = ("svd", "random")


class MaestroLinear(nn.Module):
    """``y = U[:, :b] V[:b] x + bias`` with ``b = sampled`` in training (set by :class:`OrderedDropout`), else ``r``."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool = True, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        require(isinstance(rank, int) and 1 <= rank, "rank", rank, "must be a positive integer")
        self.u = nn.Parameter(torch.randn(d_out, rank, device=device, dtype=dtype) / rank ** 0.5)  # (d_out, r)
        self.v = nn.Parameter(torch.randn(rank, d_in, device=device, dtype=dtype) / d_in ** 0.5)  # (r, d_in)
        self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype)) if bias else None
        self.sampled: int | None = None  # the ordered-dropout rank of the current step; None: the full rank

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, init: str = "svd") -> "MaestroLinear":
        """A rank-``rank`` layer for ``linear``: its truncated SVD (``"svd"``) or random factors (``"random"``);
        the bias is copied."""
        require(init in MAESTRO_INITS, "init", init, f"must be one of {MAESTRO_INITS}")
        d_out, d_in = linear.weight.shape
        require(isinstance(rank, int) and 1 <= rank <= min(d_in, d_out), "rank", rank,
                f"must be an integer in [1, {min(d_in, d_out)}] for a {d_out} x {d_in} layer")
        w = linear.weight
        layer = cls(d_in, d_out, rank, linear.bias is not None, device=w.device, dtype=w.dtype)
        if init == "svd":
            p, s, qt = torch.linalg.svd(w.float(), full_matrices=False)  # (d_out, m), (m,), (m, d_in)
            root = s[:rank].sqrt()
            layer.u.copy_(p[:, :rank] * root)
            layer.v.copy_(root[:, None] * qt[:rank])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        b = self.sampled if self.training and self.sampled is not None else self.rank
        return F.linear(F.linear(x, self.v[:b]), self.u[:, :b], self.bias)  # (..., b) -> (..., d_out)

    def penalty(self) -> Tensor:
        """``Σ_{b=1}^{r} ||U[:, b-1:]||_F + ||V[b-1:]||_F``: the hierarchical group lasso of nested tails."""
        u_tails = self.u.pow(2).sum(0).flip(0).cumsum(0).flip(0)  # (r,): ||U[:, b-1:]||^2
        v_tails = self.v.pow(2).sum(1).flip(0).cumsum(0).flip(0)  # (r,): ||V[b-1:]||^2
        return u_tails.clamp_min(1e-24).sqrt().sum() + v_tails.clamp_min(1e-24).sqrt().sum()

    @torch.no_grad()
    def truncate(self, k: int) -> "MaestroLinear":
        """A new layer with the first ``k`` components (``k (d_in + d_out)`` factor parameters)."""
        require(isinstance(k, int) and 1 <= k <= self.rank, "k", k, f"must be an integer in [1, {self.rank}]")
        layer = MaestroLinear(self.v.shape[1], self.u.shape[0], k, self.bias is not None,
                              device=self.u.device, dtype=self.u.dtype)
        layer.u.copy_(self.u[:, :k])
        layer.v.copy_(self.v[:k])
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return f"d_in={self.v.shape[1]}, d_out={self.u.shape[0]}, rank={self.rank}, bias={self.bias is not None}"


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def maestro_layers(model: nn.Module) -> list[tuple[str, MaestroLinear]]:
    """``(path, layer)`` of every :class:`MaestroLinear` of ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, MaestroLinear)]


def maestro_model(model: nn.Module, rank: int, targets: Sequence[str], init: str = "svd") -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose path is a name of ``targets`` or ends with ``"." + name`` by a
    :class:`MaestroLinear` of rank ``min(rank, d_in, d_out)``; returns ``model``."""
    require(isinstance(targets, (list, tuple)) and len(targets) > 0, "targets", targets,
            "must be a non-empty list of module names")
    found = [(p, m) for p, m in model.named_modules() if p and any(p == t or p.endswith("." + t) for t in targets)]
    require(bool(found), "targets", targets, "matched no module of the model")
    for path, module in found:
        require(type(module) is nn.Linear, "targets", targets, f"matched {path!r}, a {type(module).__name__}; "
                "Maestro replaces plain nn.Linear layers")
        _set(model, path, MaestroLinear.from_linear(module, min(rank, *module.weight.shape), init)
             .train(module.training))
    return model


def truncate_model(model: nn.Module, k: int) -> nn.Module:
    """Cut every :class:`MaestroLinear` of ``model`` to its first ``min(k, r)`` components, in place."""
    for path, layer in maestro_layers(model):
        _set(model, path, layer.truncate(min(k, layer.rank)))
    return model


class OrderedDropout(TrainingHook):
    """Samples each layer's rank ``b ~ U{1, ..., r}`` before the step's forward (its own seeded generator; every
    micro-batch of a step uses the same ``b``), adds ``λ R(U, V)`` as the step's regulariser and restores the full
    rank after the step."""

    def __init__(self, penalty: float = 0.0, seed: int = 0) -> None:
        require(penalty >= 0.0, "penalty", penalty, "must be >= 0")
        self.penalty = penalty
        self.generator = torch.Generator().manual_seed(seed)
        self.last: list[int] = []

    def before_forward(self, model: nn.Module, step: int) -> None:
        layers = maestro_layers(model)
        require(bool(layers), "model", type(model).__name__, "has no MaestroLinear layer (see maestro_model)")
        self.last = []
        for _, layer in layers:
            layer.sampled = int(torch.randint(1, layer.rank + 1, (), generator=self.generator))
            self.last.append(layer.sampled)

    def regulariser(self, model: nn.Module) -> Tensor | None:
        if self.penalty == 0.0:
            return None
        return self.penalty * torch.stack([layer.penalty() for _, layer in maestro_layers(model)]).sum()

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for _, layer in maestro_layers(model):
            layer.sampled = None

    def metrics(self) -> dict[str, float]:
        return {"maestro/mean_rank": sum(self.last) / len(self.last)} if self.last else {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        require("generator" in state, "state", sorted(state), "must hold the sampler's 'generator' state")
        self.generator.set_state(state["generator"])
