"""O3: practical continual unlearning with an orthogonal LoRA and an OOD detector (Gao et al., ICLR 2025;
METHODS.md entry 79).

Per unlearning request ``k``:

* **Orthogonal LoRA** ``forget{k}`` trained on the forget data only (no retained data), with the O-LoRA penalty
  ``λ Σ_{i<k} Σ_layers ||A_k A_i^T||_F^2`` keeping its input subspace disjoint from earlier requests'. The
  unlearning objective is the cross-entropy between the uniform distribution and the model's over the task's
  labels, so its predictions fall to chance. (The authors' ScienceQA code relabels the forget data at random;
  tried here, held-out forget examples kept 72% accuracy on a 2-label task, since the rule that decides them is
  not what random labels remove.)
* **OOD detector**: features are the base model's hidden states at a few layers (adapters disabled), at the last
  position (``pooling="last"``, the default: in a causal LM the state that summarises the input and makes the
  prediction) or averaged over the tokens (``"mean"``). The *local* score of a layer is minus the squared Mahalanobis
  distance of an input's feature to a Gaussian fitted on the forget set's (``shrinkage`` times the mean variance added
  to the covariance's diagonal); the *global* score averages the layers, each in units of its median on held-out
  forget examples. Calibrated on those held-out forget examples only: ``s(x) = sigmoid((score - τ) / T)``, ``τ`` their
  5% quantile and ``T`` a third of the distance from ``τ`` to their median (so a typical forget input gets ``s ≈
  0.95``). Measured on SmolLM2 with the dialogue task as the request: mean-pooled features gave every task ``s ≈
  0.8-0.9`` (tweets 0.83, Shakespeare 0.88, dialogue 0.89; the held-out forget scores spread as widely as the other
  tasks'), last-position features 0.00 / 0.00 / 0.93. With ``contrastive=True`` the features first pass through a
  projection head per layer trained with the paper's contrastive (InfoNCE cross-entropy) loss between two views of
  each forget example (random token masking); on the tiny test model those heads (fitted on forget data alone) erased
  the separation the raw features have, so raw features are the default; the paper's exact loss and head are not in
  its abstract.
* **Inference**: every layer computes ``W x + Σ_k s_k(x) ΔW_k x`` (per-row weights, :func:`lorakit.mix`);
  ``s = 0`` is exactly the base model.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import require
from ..hooks import TrainingHook
from ..hosts.host import hosts
from ..inject import disable, set_active
from ..mixing import mix
from ..train.tasks import ClassificationTask, Example
from .learners import DEFAULT_ADAPTER, AdapterSettings, fresh_adapter
from .loop import DEFAULT_FIT, Batch, FitSettings, fit
from .unlearn import UNLEARNERS, Retained, Unlearner


class Orthogonality(TrainingHook):
    """O-LoRA's regulariser: ``weight * Σ_{earlier} Σ_layers ||A_name A_earlier^T||_F^2`` (earlier ones fixed)."""

    def __init__(self, name: str, earlier: Sequence[str], weight: float) -> None:
        self.name, self.earlier, self.weight = name, list(earlier), weight

    def penalty(self, model: nn.Module) -> Tensor:
        total = None
        for host in hosts(model):
            if self.name not in host.adapters:
                continue
            a = host.adapters[self.name].a
            for other in self.earlier:
                if other in host.adapters:
                    term = (a @ host.adapters[other].a.detach().T).square().sum()
                    total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def regulariser(self, model: nn.Module) -> Tensor | None:
        return self.weight * self.penalty(model) if self.earlier else None


def uniform_target(scorer: ClassificationTask) -> Callable[[nn.Module, Batch], Tensor]:
    """Cross-entropy from the uniform distribution over the task's labels: ``-mean_labels log p(label | x)``."""
    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return -scorer.label_logits(model, batch).log_softmax(-1).mean()
    return loss


POOLINGS = ("last", "mean")


def hidden_features(model: nn.Module, batch: Batch, layers: Sequence[int], pooling: str = "last") -> list[Tensor]:
    """Hidden states ``(B, H)`` of the base model (adapters disabled) at ``layers``: at the last position (``"last"``:
    a causal LM's summary of the whole input, where it predicts; batches are left-padded) or averaged over the real
    tokens (``"mean"``)."""
    with torch.no_grad(), disable(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_hidden_states=True)
    if pooling == "last":
        return [out.hidden_states[i][:, -1].float() for i in layers]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return [(out.hidden_states[i].float() * mask).sum(1) / mask.sum(1) for i in layers]


def masked_view(batch: Batch, rate: float, generator: torch.Generator) -> Batch:
    """The batch with a random ``rate`` of its real tokens (never the last) masked out of attention."""
    mask = batch["attention_mask"].clone()
    drop = (torch.rand(mask.shape, generator=generator) < rate) & mask.bool()
    drop[:, -1] = False
    mask[drop] = 0
    return {**batch, "attention_mask": mask}


class OodDetector(nn.Module):
    """O3's detector for one request (module docstring): per-layer Gaussians of the forget set's features (raw, or
    through contrastively trained projection heads), layer-aggregated, calibrated on held-out forget examples."""

    def __init__(self, hidden: int, layers: Sequence[int], contrastive: bool = False, dim: int = 64,
                 temperature: float = 0.1, shrinkage: float = 0.01) -> None:
        super().__init__()
        self.layers, self.contrastive = list(layers), contrastive
        self.temperature, self.shrinkage = temperature, shrinkage
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                   for _ in self.layers) if contrastive else nn.ModuleList()
        self.means: list[Tensor] = []
        self.precisions: list[Tensor] = []
        self.scales: list[float] = []
        self.tau, self.spread = 0.0, 1.0

    def project(self, features: list[Tensor]) -> list[Tensor]:
        if not self.contrastive:
            return features
        return [F.normalize(head(f), dim=-1) for head, f in zip(self.heads, features)]

    def local(self, features: list[Tensor]) -> list[Tensor]:
        """Per layer: minus the squared Mahalanobis distance to the forget set's Gaussian."""
        with torch.no_grad():
            out = []
            for z, mean, precision in zip(self.project(features), self.means, self.precisions):
                d = z - mean
                out.append(-((d @ precision) * d).sum(-1))
            return out

    def score(self, features: list[Tensor]) -> Tensor:
        """Global score: the mean over layers of the local scores, each in units of its typical forget value."""
        return torch.stack([s / scale for s, scale in zip(self.local(features), self.scales)]).mean(0)

    def weight(self, features: list[Tensor]) -> Tensor:
        """``s(x)`` in ``(0, 1)`` per row."""
        return torch.sigmoid((self.score(features) - self.tau) / self.spread)

    def train_heads(self, views: tuple[list[Tensor], list[Tensor]], steps: int, lr: float, seed: int) -> list[float]:
        """The contrastive (InfoNCE cross-entropy) loss between two views of each forget example."""
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(self.heads.parameters(), lr=lr)
        losses = []
        n = views[0][0].shape[0]
        for _ in range(steps):
            rows = torch.randperm(n)[:min(n, 64)]
            z1 = self.project([f[rows] for f in views[0]])
            z2 = self.project([f[rows] for f in views[1]])
            target = torch.arange(len(rows))
            loss = sum(F.cross_entropy(a @ b.T / self.temperature, target) for a, b in zip(z1, z2)) / len(z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    def fit(self, features: list[Tensor], held: list[Tensor], views: tuple[list[Tensor], list[Tensor]] | None = None,
            steps: int = 200, lr: float = 1e-3, seed: int = 0) -> list[float]:
        """Train the heads on two ``views`` (when contrastive), fit the per-layer Gaussians on ``features`` (the
        forget examples as they are), calibrate on ``held``."""
        require(not self.contrastive or views is not None, "views", None, "are needed to train contrastive heads")
        losses = self.train_heads(views, steps, lr, seed) if self.contrastive and views is not None else []
        with torch.no_grad():
            self.means, self.precisions = [], []
            for z in self.project(features):
                mean = z.mean(0)
                cov = torch.cov((z - mean).T.double())
                ridge = self.shrinkage * float(cov.diagonal().mean()) + 1e-6  # a constant feature has no variance
                cov += ridge * torch.eye(cov.shape[0], dtype=cov.dtype)
                self.means.append(mean)
                self.precisions.append(torch.linalg.inv(cov).float())
            self.scales = [max(1e-6, float(s.abs().median())) for s in self.local(held)]
            scores = self.score(held)
        self.tau = float(torch.quantile(scores, 0.05))
        self.spread = max(1e-3, (float(scores.median()) - self.tau) / 3)
        return losses


class O3(Unlearner):
    """O3 (module docstring). ``orthogonal_weight``: λ of the O-LoRA penalty; ``detector_layers``: how many evenly
    spaced hidden layers the detector reads; ``contrastive``: project features through contrastively trained heads;
    ``gate``: False applies every unlearning adapter fully (the ablation)."""

    name = "o3"

    def __init__(self, adapter: AdapterSettings = DEFAULT_ADAPTER, settings: FitSettings = DEFAULT_FIT,
                 orthogonal_weight: float = 1.0, detector_layers: int = 4, detector_steps: int = 200,
                 contrastive: bool = False, shrinkage: float = 0.01, pooling: str = "last", gate: bool = True) -> None:
        super().__init__(adapter, settings)
        require(orthogonal_weight >= 0, "orthogonal_weight", orthogonal_weight, "must be >= 0")
        require(isinstance(detector_layers, int) and detector_layers >= 1, "detector_layers", detector_layers,
                "must be an integer >= 1")
        self.orthogonal_weight, self.detector_layers = orthogonal_weight, detector_layers
        require(shrinkage > 0, "shrinkage", shrinkage, "must be > 0 (the forget set's covariance is singular when it "
                                                       "has fewer examples than the hidden size)")
        self.detector_steps, self.contrastive, self.gate = detector_steps, contrastive, gate
        require(pooling in POOLINGS, "pooling", pooling, f"must be one of {POOLINGS}")
        self.shrinkage, self.pooling = shrinkage, pooling
        self.names: list[str] = []
        self.detectors: list[OodDetector] = []

    def _layers(self, model: nn.Module) -> list[int]:
        n = model.config.num_hidden_layers
        return sorted({max(1, round(n * (i + 1) / self.detector_layers)) for i in range(self.detector_layers)})

    def _detector(self, model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example]) -> OodDetector:
        generator = torch.Generator().manual_seed(self.settings.seed)
        held_n = max(1, len(examples) // 5)
        train, held = examples[held_n:], examples[:held_n]
        layers = self._layers(model)

        def features(chunks: Sequence[Sequence[Example]], masked: bool = False) -> list[Tensor]:
            batches = [scorer.collate(chunk) for chunk in chunks]
            parts = [hidden_features(model, masked_view(b, 0.15, generator) if masked else b, layers, self.pooling)
                     for b in batches]
            return [torch.cat(f) for f in zip(*parts)]

        chunks = [train[i:i + 32] for i in range(0, len(train), 32)]
        views = (features(chunks, True), features(chunks, True)) if self.contrastive else None
        detector = OodDetector(model.config.hidden_size, layers, self.contrastive, shrinkage=self.shrinkage)
        detector.fit(features(chunks), features([held[i:i + 32] for i in range(0, len(held), 32)]), views,
                     steps=self.detector_steps, seed=self.settings.seed)
        return detector

    def forget(self, model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example],
               retained: Retained) -> list[float]:
        name = f"forget{len(self.names)}"
        params = fresh_adapter(model, self.adapter.lora(), name)
        hooks = [Orthogonality(name, self.names, self.orthogonal_weight)]
        losses = fit(model, scorer, examples, params, self.settings, hooks, uniform_target(scorer))
        set_active(model, [])
        self.detectors.append(self._detector(model, scorer, examples))
        self.names.append(name)
        return losses

    def weights(self, model: nn.Module, batch: Batch) -> Tensor:
        """``(B, requests)``: each request's ``s(x)`` (all ones without gating)."""
        rows = batch["input_ids"].shape[0]
        if not self.gate:
            return torch.ones(rows, len(self.names))
        layers = sorted({i for d in self.detectors for i in d.layers})
        by_layer = dict(zip(layers, hidden_features(model, batch, layers, self.pooling)))
        return torch.stack([d.weight([by_layer[i] for i in d.layers]) for d in self.detectors], dim=1)

    def predict(self, model: nn.Module, scorer: ClassificationTask, batch: Batch) -> Tensor:
        if not self.names:
            return scorer.label_logits(model, batch)
        with mix(model, self.names, self.weights(model, batch)):
            return scorer.label_logits(model, batch)


UNLEARNERS.register("o3", O3)
