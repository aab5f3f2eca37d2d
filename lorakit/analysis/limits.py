"""The norms that decide the phase transition of LoRA's computational limits (METHODS.md entry 82).

Hu, Su, Kuo, Song & Liu, "Computational Limits of Low-Rank Adaptation (LoRA) for Transformer-Based Models" (2024),
after Alman & Song, "Fast Attention Requires Bounded Entries" (2023): the gradient of a LoRA-adapted
attention layer has an almost-linear-time approximation only when the entries of the products of the input ``X``
with the adapted weights ``W* = W + (alpha / r) B A`` are bounded by ``o(sqrt(log L))`` for sequences of ``L``
tokens; with entries of size ``omega(sqrt(log L))`` no sub-quadratic algorithm exists under SETH. Per adapted linear
layer this module measures

- ``||X||``: the largest row (token) norm of the layer's input over a batch, captured by a forward pre-hook;
- ``||W||_2``: the spectral norm of the frozen weight;
- ``||s B A||_2``: the spectral norm of the update, from its factors (QR + SVD of the ``r x r`` core, never dense);

and ``bound = ||X|| (||W||_2 + ||s B A||_2)``, which bounds every entry of ``X W*^T`` (``|x_i . w*_j| <= ||x_i||
||W*||_2``): the quantity the paper compares with ``sqrt(log L)``. Only linear layers are measured (a convolution's
input rows are patches, an embedding's are token ids).

:class:`NormMonitor` logs the same numbers every training step as ``limits/<layer>/<quantity>`` (the input norm: the
maximum over the step's forward passes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import LorakitError
from ..hooks import TrainingHook
from ..hosts.host import HostLayer, hosts
from ..init.layout import base_matrix
from ..inject import config_of
from .spectrum import layer_update, singular_values

QUANTITIES = ("input_norm", "weight_norm", "update_norm", "bound")


@dataclass(frozen=True)
class LayerNorms:
    """One adapted linear layer's norms (``input_norm`` is ``nan`` when the batch did not reach the layer)."""

    path: str
    input_norm: float
    weight_norm: float
    update_norm: float

    @property
    def bound(self) -> float:
        """``||X|| (||W||_2 + ||s B A||_2)``: a bound on every entry of ``X (W + s B A)^T``."""
        return self.input_norm * (self.weight_norm + self.update_norm)


def linear_hosts(model: nn.Module, name: str) -> list[HostLayer]:
    """The linear host layers of ``model`` that adapter ``name`` adapts (an error when there are none)."""
    config_of(model, name)
    found = [h for h in hosts(model) if name in h.adapters and h.geometry.kind == "linear"]
    if not found:
        raise LorakitError(f"adapter {name!r} adapts no linear layer; the norms of the computational limits are "
                           "defined for linear layers only")
    return found


def weight_norm(host: HostLayer) -> float:
    """``||W||_2`` of the host's frozen weight."""
    return float(torch.linalg.matrix_norm(base_matrix(host.geometry, host.backend), ord=2))


def update_norm(host: HostLayer, name: str) -> float:
    """``||s B A||_2`` of adapter ``name`` on ``host`` (0 for a zero update)."""
    s = singular_values(layer_update(host, name))
    return float(s[0]) if s.numel() else 0.0


def _watch(layers: list[HostLayer], seen: dict[str, float]) -> list[RemovableHandle]:
    """Forward pre-hooks keeping in ``seen[path]`` the largest row norm of each layer's input."""

    def hook_for(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x: Tensor = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
            if rows.shape[0]:
                seen[path] = max(seen.get(path, 0.0), float(torch.linalg.vector_norm(rows, dim=1).max()))
        return hook

    return [h.register_forward_pre_hook(hook_for(h.path)) for h in layers]


@torch.no_grad()
def norm_report(model: nn.Module, name: str, batch_fn: Callable[[nn.Module], Any]) -> list[LayerNorms]:
    """The norms of every linear layer adapter ``name`` adapts, ``||X||`` over the forward ``batch_fn(model)`` runs
    (e.g. ``lambda m: m(input_ids)``)."""
    layers = linear_hosts(model, name)
    seen: dict[str, float] = {}
    handles = _watch(layers, seen)
    try:
        batch_fn(model)
    finally:
        for handle in handles:
            handle.remove()
    return [LayerNorms(h.path, seen.get(h.path, math.nan), weight_norm(h), update_norm(h, name)) for h in layers]


class NormMonitor(TrainingHook):
    """Logs ``limits/<layer>/{input_norm, weight_norm, update_norm, bound}`` of adapter ``name`` each step, and
    ``limits/max_bound``, the largest bound of the step."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.layers: list[HostLayer] = []
        self.seen: dict[str, float] = {}
        self.handles: list[RemovableHandle] = []
        self.weight_norms: dict[str, tuple[tuple[int, int], float]] = {}  # path -> (weight version, ||W||_2)

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.remove()
        self.layers = linear_hosts(model, self.name)
        self.handles = _watch(self.layers, self.seen)

    def before_forward(self, model: nn.Module, step: int) -> None:
        self.seen.clear()

    def _weight_norm(self, host: HostLayer) -> float:
        """``||W||_2``, recomputed only when the stored weight changed (merges, a rewritten base)."""
        version = host.backend.version()
        cached = self.weight_norms.get(host.path)
        if cached is None or cached[0] != version:
            cached = self.weight_norms[host.path] = (version, weight_norm(host))
        return cached[1]

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for host in self.layers:
            norms = LayerNorms(host.path, self.seen.get(host.path, math.nan), self._weight_norm(host),
                               update_norm(host, self.name))
            out.update({f"limits/{host.path}/{q}": float(getattr(norms, q)) for q in QUANTITIES})
        bounds = [v for k, v in out.items() if k.endswith("/bound") and not math.isnan(v)]
        if bounds:
            out["limits/max_bound"] = max(bounds)
        return out

    def remove(self) -> None:
        """Detach the forward pre-hooks from the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
