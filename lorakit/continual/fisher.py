"""Kronecker-factored Fisher information of linear layers (K-FAC; Martens & Grosse, 2015), for AlignGuard-LoRA.

For a linear layer ``y = W x`` and the loss gradient ``δ = ∂L/∂y``, the weight gradient is ``δ x^T`` and the Fisher
``E[vec(δ x^T) vec(δ x^T)^T]`` is approximated by ``G ⊗ S`` with ``G = E[δ δ^T]`` (output side) and
``S = E[x x^T]`` (input side), each averaged over tokens. For one token the factorisation is exact. Its
eigen-directions are the rank-one matrices ``u_i v_j^T`` (``u_i`` eigenvectors of ``G``, ``v_j`` of ``S``) with
eigenvalues ``μ_i σ_j``; :class:`Directions` keeps the top ``k`` of each factor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import LorakitError


@dataclass
class Directions:
    """Top eigenpairs of one layer's K-FAC factors: ``u (d_out, k)``, ``mu (k,)``, ``v (d_in, k)``, ``sigma (k,)``."""

    u: Tensor
    mu: Tensor
    v: Tensor
    sigma: Tensor

    def weights(self) -> Tensor:
        """``(k, k)`` eigenvalues ``μ_i σ_j`` of the directions ``u_i v_j^T``."""
        return self.mu[:, None] * self.sigma[None, :]


def _top(matrix: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix.double())
    order = values.flip(0)[:k].clamp_min(0), vectors.flip(1)[:, :k]
    return order[0].float(), order[1].float()


def kfac_factors(model: nn.Module, paths: Iterable[str], loss_batches: Iterable[Callable[[], Tensor]]
                 ) -> dict[str, tuple[Tensor, Tensor]]:
    """``{path: (G, S)}`` for the ``nn.Linear`` layers at ``paths``, from the backward of each loss in
    ``loss_batches`` (callables running one forward each). Token-averaged; the weights' ``requires_grad`` is
    restored afterwards and their gradients dropped."""
    modules = dict(model.named_modules())
    missing = [p for p in paths if not isinstance(modules.get(p), nn.Linear)]
    if missing:
        raise LorakitError(f"K-FAC needs nn.Linear layers; not found or not linear: {missing[:3]}")
    sums: dict[str, list] = {p: [0.0, 0.0, 0] for p in paths}
    handles, flags = [], {}

    def forward_hook(path: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[path][1] = sums[path][1] + x.T @ x
            sums[path][2] += x.shape[0]
            output.register_hook(output_grad(path))
        return hook

    def output_grad(path: str) -> Callable:
        def hook(grad: Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).float()
            sums[path][0] = sums[path][0] + g.T @ g
        return hook

    for path in paths:
        module = modules[path]
        flags[path] = module.weight.requires_grad
        module.weight.requires_grad_(True)
        handles.append(module.register_forward_hook(forward_hook(path)))
    try:
        for loss in loss_batches:
            loss().backward()
    finally:
        for handle in handles:
            handle.remove()
        for path in paths:
            modules[path].weight.requires_grad_(flags[path])
            modules[path].weight.grad = None
    out = {}
    for path, (g, s, n) in sums.items():
        if n == 0:
            raise LorakitError(f"layer {path} saw no tokens while estimating the Fisher")
        out[path] = (g / n, s / n)
    return out


def top_directions(factors: dict[str, tuple[Tensor, Tensor]], k: int) -> dict[str, Directions]:
    """The top ``k`` eigenpairs of each layer's ``G`` and ``S``."""
    out = {}
    for path, (g, s) in factors.items():
        mu, u = _top(g, k)
        sigma, v = _top(s, k)
        out[path] = Directions(u, mu, v, sigma)
    return out
