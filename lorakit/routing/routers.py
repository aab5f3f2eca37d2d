"""Routers: per-token weights over ``n`` experts computed from a layer's input, with their auxiliary losses.

A router is a callable ``router(layer_path, x) -> (*tokens, n)`` that each routed layer asks for its own input
(:class:`~lorakit.routing.weighted.WeightedRouting` for per-layer mixtures, the MoE blocks of
:mod:`lorakit.mixtures.block` for FFN-level experts). One :class:`GateRouter` holds a gate per layer; its options
cover the routers of the mixture papers:

* dense softmax (X-LoRA's one-pass variant, MeteoRA's full mode): ``w = softmax(G_l x / tau)``;
* top-k, renormalised over the kept experts (MixLoRA, MoLA k=2, LLaVA-MoLE k=1, MeteoRA k=2);
* noisy top-k (Shazeer et al. 2017, eq. 4): in training, ``H = G_l x + eps * softplus(N_l x)``, ``eps ~ N(0, 1)``;
* hard-soft (LoRA-Mixer): the forward uses the hard top-k choice (``1/k`` on each kept expert; top-1 without
  ``top_k``), the gradient is the soft weights' (straight-through estimator);
* per-layer expert counts (MoLA): layer ``l`` routes over its first ``N_l`` experts only.

Auxiliary losses (training mode only), kept per layer for the latest forward until :meth:`GateRouter.pop_loss`
takes them (the :class:`~lorakit.mixtures.hooks.RouterLosses` hook adds them to each forward's loss):

* Switch load balance (Fedus et al. 2021, eq. 4; MixLoRA, LLaVA-MoLE): ``E * sum_i f_i P_i`` with ``f_i`` the share
  of routed (token, expert) pairs going to expert ``i`` and ``P_i`` its mean router probability; its minimum, 1, is
  reached under uniform routing;
* router z-loss (Zoph et al. 2022, eq. 5): ``mean_t (logsumexp_i logits_{t,i})^2``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..registry import Registry

ROUTER_KINDS: Registry[type[nn.Module]] = Registry("router kind")


def switch_balance(probs: Tensor, kept: Tensor) -> Tensor:
    """``E * sum_i f_i P_i`` over tokens: ``probs`` the router's softmax ``(N, E)``, ``kept`` its routed weights."""
    routed = (kept != 0).to(probs.dtype)
    share = routed.sum(0) / routed.sum().clamp_min(1)  # f_i
    return probs.shape[-1] * (share * probs.mean(0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """``mean_t (logsumexp_i logits_{t,i})^2`` over the tokens ``(N, E)``."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def top_k(probs: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest of each row and renormalise them to sum to 1 (the others become exactly 0)."""
    top = probs.topk(k, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    return kept / kept.sum(-1, keepdim=True)


@ROUTER_KINDS.decorator("gate")
class GateRouter(nn.Module):
    """A linear gate per layer, ``softmax(G_l x / temperature)``, with the options of the module docstring.

    Args:
        n: number of experts the weights range over.
        layers: layer path -> its input width, for every layer the router serves.
        top_k: keep the ``k`` largest weights per token (``None``: all, dense softmax).
        temperature: softmax temperature (> 0).
        noisy: learned Gaussian noise on the logits in training (noisy top-k).
        hard: hard top-k forward with the soft gradient (straight-through).
        experts: layer path -> number of experts ``N_l`` it routes over (``None``: ``n`` everywhere).
        balance: coefficient of the Switch load-balance loss (0: not computed).
        z_loss: coefficient of the router z-loss (0: not computed).
    """

    kind = "gate"

    def __init__(self, n: int, layers: dict[str, int], top_k: int | None = None, temperature: float = 1.0,
                 noisy: bool = False, hard: bool = False, experts: dict[str, int] | None = None,
                 balance: float = 0.0, z_loss: float = 0.0) -> None:
        super().__init__()
        require(isinstance(n, int) and n >= 1, "n", n, "must be a positive integer")
        require(len(layers) > 0, "layers", layers, "must name at least one layer")
        counts = {p: n for p in layers} if experts is None else dict(experts)
        require(set(counts) == set(layers) and all(isinstance(c, int) and 1 <= c <= n for c in counts.values()),
                "experts", experts, f"must give every layer of the router an expert count in [1, {n}]")
        fewest = min(counts.values())
        require(top_k is None or (isinstance(top_k, int) and 1 <= top_k <= fewest), "top_k", top_k,
                f"must be None or an integer in [1, {fewest}] (the fewest experts of a layer)")
        require(isinstance(temperature, (int, float)) and temperature > 0, "temperature", temperature, "must be > 0")
        require(balance >= 0 and z_loss >= 0, "balance / z_loss", (balance, z_loss), "must be >= 0")
        self.n, self.top_k, self.temperature, self.noisy, self.hard = n, top_k, float(temperature), noisy, hard
        self.balance, self.z_weight, self.counts = float(balance), float(z_loss), counts
        self.paths = {path: path.replace(".", "-") for path in layers}  # module names cannot hold dots
        self.gates = nn.ModuleDict({self.paths[p]: nn.Linear(d, counts[p], bias=False) for p, d in layers.items()})
        self.noise = nn.ModuleDict({self.paths[p]: nn.Linear(d, counts[p], bias=False)
                                    for p, d in layers.items()}) if noisy else None
        for weight in self.parameters():
            nn.init.zeros_(weight)  # uniform weights at init (and noise of std softplus(0))
        self.losses: dict[str, Tensor] = {}  # layer -> weighted auxiliary loss of its latest training forward
        self.loads: dict[str, Tensor] = {}  # layer -> share of routed tokens per expert (latest training forward)
        self.entropies: dict[str, Tensor] = {}  # layer -> mean entropy of the router's softmax

    def config(self) -> dict[str, Any]:
        """What rebuilds this router (saved beside its tensors)."""
        return {"n": self.n, "layers": {p: self.gates[key].in_features for p, key in self.paths.items()},
                "top_k": self.top_k, "temperature": self.temperature, "noisy": self.noisy, "hard": self.hard,
                "experts": dict(self.counts), "balance": self.balance, "z_loss": self.z_weight}

    def logits(self, path: str, x: Tensor) -> Tensor:
        """``G_l x`` (plus the training noise when ``noisy``), ``(*tokens, N_l)``."""
        if path not in self.paths:
            raise LorakitError(f"router has no gate for layer {path!r}; it serves: {sorted(self.paths)[:5]}")
        if not x.is_floating_point():
            raise LorakitError(f"layer {path!r}: a gate router reads a layer's input vectors, not token ids")
        gate = self.gates[self.paths[path]]
        x = x.to(gate.weight.dtype)
        logits = gate(x)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise[self.paths[path]](x))
        return logits

    def forward(self, path: str, x: Tensor) -> Tensor:
        logits = self.logits(path, x)
        probs = F.softmax(logits / self.temperature, dim=-1)
        kept = probs if self.top_k is None else top_k(probs, self.top_k)
        if self.hard:
            chosen = (top_k(probs, self.top_k or 1) != 0).to(kept.dtype)
            kept = chosen / chosen.sum(-1, keepdim=True) + kept - kept.detach()
        if self.training:
            self._record(path, logits.reshape(-1, logits.shape[-1]), probs.reshape(-1, probs.shape[-1]),
                         kept.reshape(-1, kept.shape[-1]))
        missing = self.n - kept.shape[-1]
        return F.pad(kept, (0, missing)) if missing else kept

    def _record(self, path: str, logits: Tensor, probs: Tensor, kept: Tensor) -> None:
        routed = (kept != 0).float()
        self.loads[path] = (routed.sum(0) / routed.sum().clamp_min(1)).detach()
        self.entropies[path] = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean().detach()
        terms = []
        if self.balance:
            terms.append(self.balance * switch_balance(probs, kept))
        if self.z_weight:
            terms.append(self.z_weight * z_loss(logits))
        if terms:
            self.losses[path] = torch.stack(terms).sum()

    def pop_loss(self) -> Tensor | None:
        """The auxiliary losses of the latest training forward, summed over layers, and forget them."""
        losses, self.losses = list(self.losses.values()), {}
        return torch.stack(losses).sum() if losses else None

    def stats(self) -> dict[str, float]:
        """Routing statistics of the latest training forward: the mean entropy of the router's softmax and each
        expert's share of the routed tokens, averaged over the layers that hold it (uniform: ``1/N_l``)."""
        if not self.loads:
            return {}
        out = {"entropy": float(torch.stack(list(self.entropies.values())).mean())}
        for i in range(self.n):
            shares = [load[i] for load in self.loads.values() if load.numel() > i]
            out[f"load_{i}"] = float(torch.stack(shares).mean())
        return out
