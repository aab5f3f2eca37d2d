"""AlignGuard-LoRA (Das et al., 2025; METHODS.md entry 81): fine-tuning that keeps what an alignment set measures.

The Fisher of the alignment set's loss (per linear layer, K-FAC: :mod:`lorakit.continual.fisher`) gives the
alignment-critical directions ``u_i v_j^T`` (top ``k`` of each factor, eigenvalue ``μ_i σ_j``). Each layer's update
``ΔW = s B A`` splits into its projection on them and the orthogonal complement,

    ΔW_A = U U^T ΔW V V^T          (alignment-critical)        ΔW_T = ΔW - ΔW_A        (task-specific)

and the loss adds

    λ_A Σ_layers Σ_ij (μ_i σ_j / Z) (u_i^T ΔW v_j)^2          Fisher penalty on ΔW_A (0 when ΔW ⟂ every u_i v_j^T)
  + λ_T ||ΔW_T||_F^2                                         task-specific regulariser (default 0)
  + λ_C Σ |ΔW_A| ⊙ |ΔW_T| / (||ΔW_A|| ||ΔW_T||)              collision: coordinate-wise (Riemannian) overlap

``Z`` is the largest ``μ_1 σ_1`` over layers, so ``λ_A`` weighs the most sensitive direction of the model by 1.
The paper's collision term also blends in a geodesic separation of the two parts; with an exact orthogonal split
their Frobenius angle is always 90°, so that part is identically zero here and is left out.

As a continual learner (``lorakit continual --method alignguard``) each task trains a fresh LoRA, merged after it,
and the data of every finished task (plus an optional alignment set given up front) joins the protected Fisher.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import require
from ..hooks import TrainingHook
from ..hosts.host import adapters_named
from ..inject import inspect_targets, unload
from ..train.tasks import ClassificationTask, Example
from .fisher import Directions, kfac_factors, top_directions
from .learners import DEFAULT_ADAPTER, LEARNERS, AdapterSettings, Learner, fresh_adapter
from .loop import DEFAULT_FIT, FitSettings, cross_entropy, fit


def update_of(adapter: nn.Module, host: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(B, A)`` with ``ΔW = B A`` when the adapter is exactly low rank, else ``(ΔW, None)`` (dense)."""
    factors = adapter.factors()
    if factors is not None:
        return factors
    return adapter.delta_weight(host.backend), None


def split_update(d: Directions, b: Tensor, a: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(M, ΔW_A, ΔW_T)`` with ``M = U^T ΔW V`` (``(k, k)``) for ``ΔW = B A`` (or dense ``B`` when ``a`` is None)."""
    u, v = d.u.to(b), d.v.to(b)
    m = (u.T @ b) @ (a @ v) if a is not None else u.T @ b @ v
    dense = b @ a if a is not None else b
    critical = u @ m @ v.T
    return m, critical, dense - critical


class AlignGuardPenalty(TrainingHook):
    """The AlignGuard regulariser (module docstring) on adapter ``name``, for protected ``directions``."""

    def __init__(self, name: str, directions: Sequence[dict[str, Directions]], fisher_weight: float = 1.0,
                 task_weight: float = 0.0, collision_weight: float = 0.1) -> None:
        require(fisher_weight >= 0 and task_weight >= 0 and collision_weight >= 0, "weights",
                (fisher_weight, task_weight, collision_weight), "must be >= 0")
        self.name, self.directions = name, list(directions)
        self.weights = (fisher_weight, task_weight, collision_weight)
        tops = [float(d.weights().max()) for group in self.directions for d in group.values()]
        self.norm = max(tops) if tops and max(tops) > 0 else 1.0
        self.last: dict[str, float] = {}

    def terms(self, model: nn.Module) -> dict[str, Tensor]:
        """The three terms, unweighted (summed over layers and protected sets)."""
        terms: dict[str, list[Tensor]] = {"fisher": [], "task": [], "collision": []}
        for host, adapter in adapters_named(model, self.name):
            b, a = update_of(adapter, host)
            for group in self.directions:
                if host.path not in group:
                    continue
                d = group[host.path]
                m, critical, rest = split_update(d, b, a)
                terms["fisher"].append((d.weights().to(m) * m.square()).sum() / self.norm)
                terms["task"].append(rest.square().sum())
                scale = critical.norm() * rest.norm() + 1e-12
                terms["collision"].append((critical.abs() * rest.abs()).sum() / scale)
        return {k: torch.stack(v).sum() if v else torch.zeros(()) for k, v in terms.items()}

    def regulariser(self, model: nn.Module) -> Tensor:
        terms = self.terms(model)
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        return sum(w * terms[k] for w, k in zip(self.weights, ("fisher", "task", "collision")))

    def metrics(self) -> dict[str, float]:
        return {f"alignguard_{k}": v for k, v in self.last.items()}


def protected_directions(model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example],
                         paths: Sequence[str], top_k: int, batch_size: int = 8,
                         batches: int = 8) -> dict[str, Directions]:
    """The top-``top_k`` K-FAC directions of ``paths`` for the task loss on (up to ``batches`` batches of)
    ``examples``, on the model as it is (plain linear layers)."""
    loss = cross_entropy(scorer)
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)][:batches]
    calls = [(lambda chunk=chunk: loss(model, scorer.collate(chunk))) for chunk in chunks]
    return top_directions(kfac_factors(model, paths, calls), top_k)


class AlignGuard(Learner):
    """AlignGuard-LoRA as a continual learner (module docstring)."""

    name = "alignguard"

    def __init__(self, adapter: AdapterSettings = DEFAULT_ADAPTER, settings: FitSettings = DEFAULT_FIT,
                 top_k: int = 8, fisher_weight: float = 1000.0, task_weight: float = 0.0,
                 collision_weight: float = 0.1) -> None:
        super().__init__(adapter, settings)
        require(isinstance(top_k, int) and top_k >= 1, "top_k", top_k, "must be an integer >= 1")
        self.top_k = top_k
        self.weights = {"fisher_weight": fisher_weight, "task_weight": task_weight,
                        "collision_weight": collision_weight}
        self.protected: list[dict[str, Directions]] = []

    def protect(self, model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example]) -> None:
        """Add the Fisher directions of a task (or an alignment set) on the plain model to the protected set."""
        paths = [t.path for t in inspect_targets(model, self.adapter.lora())]
        self.protected.append(protected_directions(model, scorer, examples, paths, self.top_k,
                                                   self.settings.batch_size))

    def learn(self, model: nn.Module, index: int, scorer: ClassificationTask,
              examples: Sequence[Example]) -> list[float]:
        name = f"task{index}"
        params = fresh_adapter(model, self.adapter.lora(), name)
        hooks = [AlignGuardPenalty(name, self.protected, **self.weights)] if self.protected else []
        losses = fit(model, scorer, examples, params, self.settings, hooks)
        unload(model, merge_active=True)
        self.protect(model, scorer, examples)
        return losses

    def finish(self, model: nn.Module) -> nn.Module:
        return model  # every task is merged already


LEARNERS.register("alignguard", AlignGuard)
