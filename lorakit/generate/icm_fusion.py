"""ICM-Fusion (METHODS.md entry 47): *In-Context Meta-Optimized LoRA Fusion for Multi-Task Adaptation* -- a
meta-learned map from a task's context to the weights that fuse several LoRAs' task vectors.

Task vectors: adapter ``i``'s update of layer ``l``, ``tau_il = B_il A_il`` (its exact factors, scale folded in).
A fixed, seeded random view of each (``U``, ``V``: Gaussian ``(d_out, k)``, ``(d_in, k)``, one pair per layer shape)
gives unit features, per layer or, with ``per_layer=False``, concatenated over the layers (one group):

    phi_il = vec(U^T B_il A_il V) / ||.||                                                                      (1)

Learned manifold projection and in-context weights: the context ``c`` (any vector: a sentence embedding of the
task's description or of a few of its examples) and the features meet in a ``d``-dimensional latent space,

    z = P c,    alpha_g = softmax_i(<z, Q phi_gi> / sqrt(d))        (g: a layer, or the one group)             (2)

Fusion is task-vector arithmetic, written exactly as one LoRA by rank concatenation
(:func:`~lorakit.generate.sg_lora.add_weighted_lora`):

    Delta W_l = sum_i alpha_li tau_il                                                                          (3)

Meta-optimisation over training tasks ``t`` (context ``c_t``, loss ``L_t`` of the model), for ``P`` and ``Q``:

    min_{P, Q}  1/T sum_t L_t(W0 + sum_i alpha_i(c_t) tau_i)                                                    (4)

evaluated through :func:`lorakit.mix` (``base(x) + sum_i alpha_li delta_i(x)``, the forward of eq. 3, nothing
materialised). ``P`` starts at zero, so an untrained fusion is the uniform average ``alpha = 1/n``. A new task needs
only its context: its weights are one forward pass (the in-context part), no gradient step.

Left open by the abstract, assumed here: the form of the manifold projection (linear maps into a latent space after
the fixed random view (1)), the meta-learning algorithm (first-order: gradient descent on the mean loss over training
tasks, no inner loop), where the context comes from (given by the caller), and the weights' range (convex per group:
the fused vector's orientation within the task vectors' hull is learned). Not implemented: the Fusion VAE (F-VAE)
that reconstructs the fused LoRA -- here the fused LoRA is exact (3), there is nothing to reconstruct.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..mixing import mix
from .sg_lora import Factors, adapter_factors, add_weighted_lora


@dataclass(frozen=True)
class FusionTask:
    """A meta-training task: its context vector ``(context_dim,)`` and its loss of the (fused) model."""

    context: Tensor
    loss: Callable[[nn.Module], Tensor]


def task_vectors(model: nn.Module, names: Sequence[str]) -> list[Factors]:
    """Each adapter's ``{path: (B_eff, A_eff)}``; refused unless every adapter holds the same layers."""
    require(len(names) >= 2 and len(set(names)) == len(names), "names", list(names),
            "must be two or more distinct adapter names")
    factors = [adapter_factors(model, n) for n in names]
    for name, f in zip(names[1:], factors[1:]):
        if set(f) != set(factors[0]):
            raise LorakitError(f"adapters {names[0]!r} and {name!r} hold different layers (only one of them holds "
                               f"{sorted(set(f) ^ set(factors[0]))[:3]}); fusion needs the same layers")
    return factors


def task_features(factors: Sequence[Factors], per_layer: bool = True, k: int = 4, seed: int = 0) -> Tensor:
    """Eq. (1): ``(groups, n, features)`` unit features of the task vectors, layers in sorted path order."""
    require(isinstance(k, int) and k >= 1, "k", k, "must be a positive integer")
    rows = []
    for path in sorted(factors[0]):
        generator = torch.Generator().manual_seed(seed)
        b0, a0 = factors[0][path]
        u, v = (torch.randn(d, k, generator=generator) for d in (b0.shape[0], a0.shape[1]))
        rows.append(torch.stack([((u.T @ f[path][0]) @ (f[path][1] @ v)).flatten() for f in factors]))
    features = torch.stack(rows)  # (layers, n, k * k)
    if not per_layer:
        features = features.transpose(0, 1).reshape(1, len(factors), -1)
    return F.normalize(features, dim=-1)


def fuse_adapters(model: nn.Module, names: Sequence[str], weights: Tensor | Mapping[str, Tensor], name: str,
                  activate: bool = True) -> None:
    """Add LoRA ``name``: eq. (3), ``sum_i w_li B_il A_il`` exactly, for weights ``(n,)`` (every layer) or
    ``{path: (n,)}`` (one per layer)."""
    factors = task_vectors(model, names)
    paths = sorted(factors[0])
    per_layer = weights if isinstance(weights, Mapping) else {path: weights for path in paths}
    require(set(per_layer) == set(paths), "weights", sorted(per_layer), f"must name exactly the layers {paths[:3]}")
    for path, w in per_layer.items():
        require(isinstance(w, Tensor) and tuple(w.shape) == (len(names),) and bool(torch.isfinite(w).all()),
                f"weights[{path!r}]", getattr(w, "shape", w), f"must be a finite tensor of shape ({len(names)},)")
    terms = {p: [(per_layer[p][i].detach().float(), *factors[i][p]) for i in range(len(names))] for p in paths}
    add_weighted_lora(model, name, terms, activate=activate)


class IcmFusion(nn.Module):
    """Meta-learned fusion weights (eq. 2) over adapters ``names`` of ``model``.

    Args:
        context_dim: width of the task contexts.
        per_layer: one weight vector per layer (else one for the whole model).
        latent_dim: width ``d`` of the latent space.
        k: the random view's size (``k * k`` features per layer).
        seed: seeds the random view and ``Q``'s initialisation.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], context_dim: int, per_layer: bool = True,
                 latent_dim: int = 16, k: int = 4, seed: int = 0) -> None:
        super().__init__()
        for field, value in (("context_dim", context_dim), ("latent_dim", latent_dim)):
            require(isinstance(value, int) and value >= 1, field, value, "must be a positive integer")
        factors = task_vectors(model, names)
        self.names, self.paths, self.per_layer = list(names), sorted(factors[0]), per_layer
        self.register_buffer("features", task_features(factors, per_layer, k, seed))
        self.context_proj = nn.Linear(context_dim, latent_dim, bias=False)
        self.task_proj = nn.Linear(self.features.shape[-1], latent_dim, bias=False)
        nn.init.zeros_(self.context_proj.weight)
        nn.init.normal_(self.task_proj.weight, std=self.features.shape[-1] ** -0.5,
                        generator=torch.Generator().manual_seed(seed))

    def forward(self, context: Tensor) -> Tensor:
        """Eq. (2): ``(groups, n)`` fusion weights for one context ``(context_dim,)``; rows sum to 1."""
        width = self.context_proj.in_features
        require(isinstance(context, Tensor) and tuple(context.shape) == (width,), "context",
                getattr(context, "shape", context), f"must be one vector of shape ({width},)")
        z = self.context_proj(context.to(self.context_proj.weight))
        scores = self.task_proj(self.features) @ z / math.sqrt(z.shape[0])
        return torch.softmax(scores, dim=-1)

    def layer_weights(self, weights: Tensor) -> dict[str, Tensor]:
        """``{path: (n,)}`` from :meth:`forward`'s ``(groups, n)`` (one group: the same weights on every layer)."""
        require(tuple(weights.shape) == tuple(self.features.shape[:2]), "weights", tuple(weights.shape),
                f"must be (groups, n) = {tuple(self.features.shape[:2])}")
        return {p: weights[i if self.per_layer else 0] for i, p in enumerate(self.paths)}

    @contextlib.contextmanager
    def mixed(self, model: nn.Module, weights: Tensor) -> Iterator[None]:
        """Within the block the model computes eq. (3)'s fused adapter for ``weights`` ``(groups, n)`` (unmerged)."""
        by_path = self.layer_weights(weights)
        with mix(model, self.names, lambda path, x: by_path[path]):
            yield

    def task_loss(self, model: nn.Module, task: FusionTask) -> Tensor:
        """``L_t`` of the model fused with the weights of ``task``'s context (differentiable in ``P``, ``Q``)."""
        with self.mixed(model, self(task.context)):
            return task.loss(model)

    def meta_train(self, model: nn.Module, tasks: Sequence[FusionTask], steps: int = 100,
                   lr: float = 1e-2) -> list[float]:
        """Eq. (4) by Adam on ``P``, ``Q`` only (the adapters' tensors get no gradient); the mean loss per step."""
        require(len(tasks) > 0, "tasks", len(tasks), "must hold at least one task")
        require(isinstance(steps, int) and steps >= 1, "steps", steps, "must be a positive integer")
        require(lr > 0, "lr", lr, "must be > 0")
        params = list(self.parameters())
        optimizer = torch.optim.Adam(params, lr=lr)
        history = []
        for _ in range(steps):
            loss = sum(self.task_loss(model, task) for task in tasks) / len(tasks)
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            optimizer.step()
            history.append(float(loss.detach()))
        return history

    @torch.no_grad()
    def fuse(self, model: nn.Module, context: Tensor, name: str, activate: bool = True) -> Tensor:
        """Add LoRA ``name``, the fusion (3) for ``context``'s weights; returns them ``(groups, n)``."""
        weights = self(context)
        fuse_adapters(model, self.names, self.layer_weights(weights), name, activate=activate)
        return weights
