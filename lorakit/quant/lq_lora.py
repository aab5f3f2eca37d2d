"""LQ-LoRA (Guo et al., 2024; METHODS.md entry 40): ``W ≈ Q + L1 L2``, quantised ``Q`` frozen, ``L1 L2`` trained.

The decomposition alternates (paper, Algorithm 1; LoftQ's iteration is the same, :mod:`lorakit.init.loftq`)

    Q_t = quant(W - L_{t-1}),     L_t = SVD_r(W - Q_t)          (L_0 = 0)

and keeps the best iterate, so the returned error never exceeds the first one (the paper stops when the error
rises; we run all ``iters`` and keep the best). The data-aware variant minimises ``||F^{1/2} ⊙ (W - Q - L)||_F``
with the diagonal empirical Fisher ``F`` replaced, as in the paper, by its row/column approximation
``F ≈ d_row d_col^T`` (``d_row``/``d_col`` the row/column means of ``F``): the L-step is then the exact weighted
SVD ``D_r^{-1/2} SVD_r(D_r^{1/2} (W - Q) D_c^{1/2}) D_c^{-1/2}``; the Q-step stays plain rounding (as in the paper).

Per-matrix bit budgets: each layer picks one quantisation configuration (scheme, block) so that the average
storage bits per weight (k-bit codes + the codec's scales, :func:`config_bits`) stay within ``budget`` and the sum
of squared (weighted) errors is smallest. The paper solves this with an ILP; we solve the same multiple-choice
knapsack exactly by enumeration when there are at most 100 000 assignments, else by Lagrangian relaxation (bisection
on the price of a bit, optimal on each layer's lower convex hull) followed by a greedy upgrade with the bits left.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import require
from ..hosts.codecs import check_available, storage_bits
from ..hosts.host import adapters_named
from ..init.alternating import decompose
from ..init.registry import Factors
from ..inject import adapt
from ..methods.lora import Lora, LoraConfig
from .model import quantize

DEFAULT_CONFIGS = (("nf2", 64), ("nf3", 64), ("nf4", 64), ("int8", 64))
_EXACT_LIMIT = 100_000


def config_bits(scheme: str, block: int, backend: str = "lorakit") -> float:
    """Storage bits per weight of one configuration, measured on a 64 x 4096 matrix (codes + scales + tables)."""
    codec = check_available(backend)
    probe = nn.Linear(4096, 64, bias=False)
    return storage_bits(codec.quantize(probe, scheme, block)) / probe.weight.numel()


def allocate(errors: Sequence[Sequence[float]], bits: Sequence[Sequence[float]], sizes: Sequence[int],
             budget: float) -> list[int]:
    """Configuration index per matrix minimising ``sum errors`` with ``sum bits * size <= budget * sum size``."""
    n = len(errors)
    total = budget * sum(sizes)
    cost = [[b * s for b in row] for row, s in zip(bits, sizes)]
    require(sum(min(row) for row in cost) <= total + 1e-9, "budget", budget,
            f"is below the cheapest configuration ({sum(min(r) for r in cost) / sum(sizes):.4f} bits per weight)")
    options = [range(len(row)) for row in errors]
    if all(len(row) == len(errors[0]) for row in errors) and len(errors[0]) ** n <= _EXACT_LIMIT:
        feasible = (c for c in itertools.product(*options) if sum(cost[i][k] for i, k in enumerate(c)) <= total + 1e-9)
        return list(min(feasible, key=lambda c: sum(errors[i][k] for i, k in enumerate(c))))
    return _lagrangian(errors, cost, total)


def _lagrangian(errors: Sequence[Sequence[float]], cost: Sequence[Sequence[float]], total: float) -> list[int]:
    def pick(price: float) -> list[int]:
        return [min(range(len(e)), key=lambda k: e[k] + price * c[k]) for e, c in zip(errors, cost)]

    def spent(choice: list[int]) -> float:
        return sum(cost[i][k] for i, k in enumerate(choice))

    lo, hi = 0.0, 1.0
    while spent(pick(hi)) > total:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(pick(mid)) > total else (lo, mid)
    choice = pick(hi)
    while True:  # spend what is left on the best error reduction per extra bit
        left = total - spent(choice)
        moves = [((errors[i][choice[i]] - errors[i][k]) / (cost[i][k] - cost[i][choice[i]]), i, k)
                 for i in range(len(choice)) for k in range(len(cost[i]))
                 if 0 < cost[i][k] - cost[i][choice[i]] <= left and errors[i][k] < errors[i][choice[i]]]
        if not moves:
            return choice
        _, i, k = max(moves)
        choice[i] = k


@dataclass(frozen=True)
class LqReport:
    """What :func:`lq_lora` did: per layer the chosen configuration and decomposition errors."""

    configs: dict[str, tuple[str, int]]
    errors: dict[str, list[float]]
    bits_per_weight: float


def lq_lora(model: nn.Module, config: LoraConfig, name: str = "default", *,
            configs: Sequence[tuple[str, int]] = (("nf3", 64),), budget: float | None = None, iters: int = 10,
            backend: str = "lorakit", fisher: Mapping[str, Tensor] | None = None) -> LqReport:
    """Add LoRA adapter ``name`` initialised by LQ-LoRA and quantise its layers' bases in place.

    Args:
        config: a :class:`~lorakit.LoraConfig` (targets, rank, alpha); its ``init`` is ignored.
        configs: candidate ``(scheme, block)`` per matrix; with one candidate every matrix uses it.
        budget: average storage bits per weight over the adapted layers; ``None`` needs a single candidate.
        fisher: ``{layer path: (d_out, d_in) diagonal Fisher}`` for the data-aware variant (e.g. from
            :func:`empirical_fisher`); layers without an entry are unweighted.
    """
    require(type(config) is LoraConfig, "config", type(config).__name__,
            "must be a LoraConfig (LQ-LoRA's adapter is plain LoRA: its factors start at the decomposition's L1 L2)")
    require(len(configs) >= 1, "configs", configs, "must list at least one (scheme, block)")
    require(budget is not None or len(configs) == 1, "budget", budget, "is needed to choose among several configs")
    codec = check_available(backend)
    for scheme, block in configs:
        codec.check(scheme, block)
    adapt(model, config.replace(init="gaussian", init_options={}), name)
    layers = {h.path: h for h, _ in adapters_named(model, name)}
    require(all(isinstance(h.adapters[name], Lora) for h in layers.values()), "config", config.method,
            "must be plain LoRA")
    fisher = fisher or {}
    found = {path: [decompose(h.backend.weight(), h.adapters[name].config.r, s, b, iters, backend, fisher.get(path))
                    for s, b in configs] for path, h in layers.items()}
    bits = [config_bits(s, b, backend) for s, b in configs]
    if len(configs) == 1:
        choice = {path: 0 for path in layers}
    else:
        paths = list(layers)
        picked = allocate([[d.error for d in found[p]] for p in paths], [bits] * len(paths),
                          [layers[p].backend.weight().numel() for p in paths], budget)
        choice = dict(zip(paths, picked))
    for path, host in layers.items():
        adapter, dec = host.adapters[name], found[path][choice[path]]
        root = adapter.scale ** -0.5
        adapter.apply_factors(Factors(b=dec.l1 * root, a=dec.l2 * root), adapter.a.dtype)
        host.backend.set_weight(dec.source)  # quantising W - L_{t-1} again reproduces Q_t exactly
        scheme, block = configs[choice[path]]
        quantize(model, scheme, backend, targets=[path], block=block)
    sizes = {p: h.backend.weight().numel() for p, h in layers.items()}
    avg = sum(bits[choice[p]] * sizes[p] for p in layers) / sum(sizes.values())
    return LqReport({p: configs[choice[p]] for p in layers}, {p: found[p][choice[p]].errors for p in layers}, avg)


def empirical_fisher(model: nn.Module, batches: Sequence[Mapping[str, Tensor]],
                     paths: Sequence[str]) -> dict[str, Tensor]:
    """Mean squared gradient of the loss (``model(**batch).loss``) w.r.t. the weights of ``paths``, per batch."""
    weights = {p: model.get_submodule(p).weight for p in paths}
    flags = {p: w.requires_grad for p, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    out = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in weights.items()}
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, list(weights.values()))
        for p, g in zip(weights, grads):
            out[p] += g.float().square() / len(batches)
    for p, w in weights.items():
        w.requires_grad_(flags[p])
    return out
