"""ICM-LoRA (METHODS.md entry 49) -- *In-Context Meta LoRA Generation*: a conditional VAE that emits LoRA weights.

A bank of LoRAs, one per task, trains a conditional VAE (CVAE) whose condition is a task context; for a new context
its decoder emits a new adapter's weights, which are loaded as a real lorakit adapter (no fine-tuning):

    (1) flatten:     w = [vec(theta_1); ...; vec(theta_K)]          theta_k: the adapter's tensors, lorakit key order
    (2) normalise:   w~ = (w - mu) / sigma_k                          mu: bank mean per element, sigma_k: one std per
                                                                      tensor k (per-layer normalisation), floored at
                                                                      1e-3 of the tensor's RMS
    (3) encoder:     q(z | w~, c) = N(m(w~, c), diag exp(v(w~, c)))
    (4) decoder:     w^ = D(z, c)
    (5) loss (ELBO): L = ||w^ - w~||^2 / d + beta * KL(q(z | w~, c) || N(0, I)),   z = m + exp(v / 2) * eps
    (6) generate:    w = sigma * D(0, c) + mu                         (the prior mean: deterministic)

In-context task vector (the paper's "in-context meta-learning"): ``c`` is the base model's (adapters off) last hidden
state averaged over the positions and the examples of a task, centred on the bank's mean context and divided by
one overall scale (Eq. 2 with a single segment: a per-dimension scale would blow up dimensions that carry noise).

Assumptions (the abstract leaves them open): the task description is given as examples of the task read by the base
model itself (the more tokens, the less noisy ``c``); encoder and decoder are two-layer MLPs; the latent is small
(default 4) and ``beta`` (default 0.1) keeps the posterior near the prior, so the decoder is driven by ``c`` and
generating at ``z = 0`` reproduces the bank (a much smaller ``beta`` lets ``z`` carry what ``c`` should); every bank
adapter has the same config and targets (one layout), and, for the map from context to weights to be smooth, the
bank's adapters are trained from one shared initialisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..inject import config_of, disable
from ..io.adapter_files import adapter_tensors, attach_adapter

SOURCE = "ICM-LoRA generator"


@dataclass(frozen=True)
class Layout:
    """How an adapter's tensors sit in its flat vector: its config, lorakit keys and shapes, in order."""

    config: AdapterConfig
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)


def flatten_adapter(model: nn.Module, name: str) -> tuple[Tensor, Layout]:
    """Eq. 1: adapter ``name``'s tensors as one float32 vector, and the :class:`Layout` that undoes it."""
    tensors = adapter_tensors(model, name)
    integer = [k for k, v in tensors.items() if not v.is_floating_point()]
    require(not integer, "name", name, f"must be an adapter of floating-point tensors (has {integer[:3]})")
    layout = Layout(config_of(model, name), tuple(tensors), tuple(tuple(v.shape) for v in tensors.values()))
    return torch.cat([v.detach().reshape(-1).float() for v in tensors.values()]), layout


def unflatten(vector: Tensor, layout: Layout) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_adapter`: lorakit-keyed tensors (as :func:`~lorakit.io.adapter_files.read_adapter`
    returns them) from a flat vector."""
    require(vector.dim() == 1 and vector.numel() == layout.size, "vector", tuple(vector.shape),
            f"must be a flat vector of {layout.size} values")
    parts = vector.split(list(layout.sizes))
    return {k: p.reshape(s).clone() for k, p, s in zip(layout.keys, parts, layout.shapes)}


@dataclass(frozen=True)
class Standardizer:
    """Eq. 2: ``x~ = (x - mean) / scale`` with an element-wise bank mean and one scale per segment."""

    mean: Tensor
    scale: Tensor

    @classmethod
    def fit(cls, rows: Tensor, sizes: Sequence[int], rel_floor: float = 1e-3, eps: float = 1e-12) -> "Standardizer":
        """Fit on ``rows`` (n, d); ``sizes`` splits the d columns into segments, each scaled by the root mean square
        of its deviations from the mean, floored at ``rel_floor`` times the root mean square of its values: a tensor
        that barely moves across the bank (a ``lora_A`` whose ``B`` stayed near 0) is not blown up from float noise
        to unit scale."""
        require(rows.dim() == 2 and sum(sizes) == rows.shape[1], "sizes", list(sizes),
                f"must split the {tuple(rows.shape)} rows' columns")
        mean, columns = rows.mean(0), list(sizes)
        scales = [torch.maximum(dev.pow(2).mean().sqrt(), rel_floor * val.pow(2).mean().sqrt()).clamp_min(eps)
                  for dev, val in zip((rows - mean).split(columns, dim=1), rows.split(columns, dim=1))]
        return cls(mean, torch.cat([s.expand(n) for s, n in zip(scales, sizes)]))

    def encode(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale

    def decode(self, x: Tensor) -> Tensor:
        return x * self.scale + self.mean


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, d_out))


class ConditionalVAE(nn.Module):
    """Eqs. 3-4: ``q(z | w, c)`` and ``D(z, c)`` over normalised weight vectors ``w`` and contexts ``c``."""

    def __init__(self, dim: int, context_dim: int, latent: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = _mlp(dim + context_dim, hidden, 2 * latent)
        self.decoder = _mlp(latent + context_dim, hidden, dim)

    def encode(self, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each ``(n, latent)``."""
        mean, logvar = self.encoder(torch.cat([w, c], -1)).chunk(2, -1)
        return mean, logvar

    def decode(self, z: Tensor, c: Tensor) -> Tensor:
        return self.decoder(torch.cat([z, c], -1))

    def forward(self, w: Tensor, c: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction through a reparameterised sample, posterior mean, posterior log-variance."""
        mean, logvar = self.encode(w, c)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        return self.decode(z, c), mean, logvar


def elbo_loss(recon: Tensor, target: Tensor, mean: Tensor, logvar: Tensor, beta: float) -> Tensor:
    """Eq. 5: mean squared reconstruction error plus ``beta`` times the mean KL to ``N(0, I)``."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
    return (recon - target).pow(2).mean() + beta * kl.mean()


@dataclass(frozen=True)
class IcmGenerator:
    """A trained ICM-LoRA generator: the CVAE, the weight and context standardizers, and the adapter layout."""

    cvae: ConditionalVAE
    weights: Standardizer
    contexts: Standardizer
    layout: Layout

    @torch.no_grad()
    def generate(self, context: Tensor) -> Tensor:
        """Eq. 6: the flat adapter vector for ``context`` (``(c,)``, or ``(n, c)`` for ``n`` adapters)."""
        width = self.contexts.mean.numel()
        require(context.shape[-1:] == (width,) and context.dim() in (1, 2), "context", tuple(context.shape),
                f"must be ({width},) or (n, {width})")
        c = self.contexts.encode(context.detach().float().cpu())
        z = torch.zeros(*c.shape[:-1], self.cvae.latent)
        return self.weights.decode(self.cvae.decode(z, c))


def fit_generator(vectors: Tensor, contexts: Tensor, layout: Layout, *, steps: int = 1500, lr: float = 3e-3,
                  beta: float = 0.1, latent: int = 4, hidden: int = 128, seed: int = 0) -> IcmGenerator:
    """Train the CVAE (Eq. 5, full batch, Adam) on a bank: ``vectors`` (n, d) from :func:`flatten_adapter` and their
    task ``contexts`` (n, c) from :func:`task_context`. The generator is small and lives on the CPU."""
    n = vectors.shape[0]
    require(vectors.dim() == 2 and n >= 2 and vectors.shape[1] == layout.size, "vectors", tuple(vectors.shape),
            f"must be (n >= 2, {layout.size}) flat adapters of the layout")
    require(contexts.dim() == 2 and contexts.shape[0] == n, "contexts", tuple(contexts.shape),
            f"must be ({n}, c): one context per adapter")
    require(bool(torch.isfinite(vectors).all() and torch.isfinite(contexts).all()), "vectors", "non-finite",
            "must hold finite values (with the contexts)")
    vectors, contexts = vectors.detach().float().cpu(), contexts.detach().float().cpu()
    weights, ctx = Standardizer.fit(vectors, layout.sizes), Standardizer.fit(contexts, [contexts.shape[1]])
    w, c = weights.encode(vectors), ctx.encode(contexts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cvae = ConditionalVAE(layout.size, c.shape[1], latent, hidden)
    noise = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(cvae.parameters(), lr=lr)
    for _ in range(steps):
        recon, mean, logvar = cvae(w, c, noise)
        loss = elbo_loss(recon, w, mean, logvar, beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return IcmGenerator(cvae.eval().requires_grad_(False), weights, ctx, layout)


@torch.no_grad()
def sequence_features(model: nn.Module, ids: Tensor) -> Tensor:
    """``(n, width)``, float32 on the CPU: the base model's (adapters off) last hidden state of each sequence of
    ``ids``, averaged over positions."""
    require(ids.dim() == 2 and ids.shape[0] >= 1 and not ids.is_floating_point(), "ids", tuple(ids.shape),
            "must be a non-empty (n, T) batch of token ids")
    with disable(model):
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float().mean(1).cpu()


def task_context(model: nn.Module, examples: Tensor) -> Tensor:
    """The in-context task vector ``c``: :func:`sequence_features` of a task's ``examples``, averaged."""
    return sequence_features(model, examples).mean(0)


def generate_adapter(model: nn.Module, generator: IcmGenerator, context: Tensor, name: str, *,
                     activate: bool = True) -> nn.Module:
    """Add adapter ``name`` (the bank's config) to ``model`` holding the weights generated for ``context`` (Eq. 6);
    it saves and loads like any adapter. On an error the model is left without ``name``."""
    require(context.dim() == 1, "context", tuple(context.shape), "must be one task's context vector")
    tensors = unflatten(generator.generate(context), generator.layout)
    return attach_adapter(model, generator.layout.config, tensors, name, SOURCE, activate=activate)
