"""MoS, Mixture of Shards (Wang et al., 2025; METHODS.md entry 12): LoRA factors assembled from global shard pools.

    A_l[j] = concat_{s=1..l} pool_A[idx_A[l, j, s]],   B_l[:, j] = concat_{s=1..l} pool_B[idx_B[l, j, s]]
    dW_l = s * B_l A_l,       s = alpha / r

Every rank vector (a row of ``A_l``, a column of ``B_l``) is cut into ``shards`` pieces (*vector sharding*), each
piece taken from a global pool shared by all layers (*inter-layer sharing*) or, for the first ``private_rank`` rank
vectors, from the layer's own parameters (*shard privatization*). The ``A`` and ``B`` pieces are chosen independently
(*pair dissociation*), and each layer draws its own pieces (*subset selection*). Pools are keyed by side and piece
length (``"A<d_in / shards>"``, ``"B<d_out / shards>"``) and hold ``pool_size`` pieces each, stored once per model
(:class:`ShardPools`), so the shared trainable count is ``pool_size * (sum of the distinct piece lengths)`` whatever
the number of adapted layers; privatized vectors add ``private_rank * (d_in + d_out)`` per layer.

Assumed (the abstract calls the selection "MoE-like routing" without saying whether it is learned; METHODS.md says
verify): the selection indices are fixed random at adapt time (the "nearly cost-free" reading), drawn from
``seed`` and saved with the adapter (integer tensors ``mos_index_A/B``); the slots of a pool take its pieces in
repeated random permutations, so every piece is used (evenly) once a pool has at least ``pool_size`` slots; fewer
slots is an error.
``pool_B`` and private ``B`` start at zero (LoRA's zero ``B``), ``pool_A`` and private ``A`` Kaiming-uniform.
The forward assembles ``A_l``, ``B_l`` (an ``r (d_in + d_out)`` gather) and applies two thin products, never ``dW``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from ..errors import ConfigError, require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities, SharedState, register_method


@dataclass(frozen=True)
class MosConfig(AdapterConfig):
    """Config of a MoS adapter.

    Attributes:
        r: rank of every layer's assembled ``B_l A_l``.
        alpha: the update is scaled by ``alpha / r``.
        shards: pieces each rank vector is cut into; must divide every targeted layer's ``d_in`` and ``d_out``.
        pool_size: pieces in each global pool.
        private_rank: rank vectors per layer built from the layer's own (unshared) parameters; at most ``r``.
        seed: seed of the piece selection.
    """

    r: int = 8
    alpha: float = 8.0
    shards: int = 2
    pool_size: int = 16
    private_rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)
        require(isinstance(self.shards, int) and self.shards >= 1, "shards", self.shards, "must be a positive integer")
        require(isinstance(self.pool_size, int) and self.pool_size >= 1, "pool_size", self.pool_size,
                "must be a positive integer")
        require(isinstance(self.private_rank, int) and 0 <= self.private_rank <= self.r, "private_rank",
                self.private_rank, f"must be an integer in [0, r={self.r}]")
        require(isinstance(self.seed, int), "seed", self.seed, "must be an integer")

    @property
    def shared_rank(self) -> int:
        return self.r - self.private_rank


def _pool_keys(config: MosConfig, geometry: Geometry) -> tuple[str, str]:
    for name, d in (("d_in", geometry.d_in), ("d_out", geometry.d_out)):
        if d % config.shards:
            raise ConfigError(f"shards={config.shards} is invalid: must divide every targeted layer's {name} "
                              f"(a layer has {name}={d})")
    return f"A{geometry.d_in // config.shards}", f"B{geometry.d_out // config.shards}"


class ShardPools(SharedState):
    """The global pools ``pool_A[<len>]: (pool_size, len)`` and ``pool_B[<len>]``, and the piece assignment."""

    def __init__(self, config: MosConfig, geometries: list[Geometry]) -> None:
        super().__init__()
        self.pools = nn.ParameterDict()
        slots: dict[str, int] = {}
        for g in geometries:
            for key in _pool_keys(config, g):
                slots[key] = slots.get(key, 0) + config.shared_rank * config.shards
        for key in sorted(k for k, n in slots.items() if n):
            if slots[key] < config.pool_size:
                raise ConfigError(f"pool_size={config.pool_size} is invalid: pool {key!r} has only {slots[key]} slots "
                                  "over the targeted layers, so some pieces would never be used; lower pool_size")
            pool = torch.empty(config.pool_size, int(key[1:]))
            if key[0] == "A":  # LoRA's Kaiming-uniform bound for an A row of d_in = shards * piece length
                bound = 1.0 / math.sqrt(int(key[1:]) * config.shards)
                nn.init.uniform_(pool, -bound, bound)
            else:
                nn.init.zeros_(pool)
            self.pools[key] = nn.Parameter(pool)
        self._gen = torch.Generator().manual_seed(config.seed)
        self._queues: dict[str, list[int]] = {key: [] for key in self.pools}

    def draw(self, key: str, n: int) -> Tensor:
        """The next ``n`` piece indices of pool ``key``: consecutive random permutations of the pool."""
        queue = self._queues[key]
        while len(queue) < n:
            queue.extend(torch.randperm(len(self.pools[key]), generator=self._gen).tolist())
        taken, self._queues[key] = queue[:n], queue[n:]
        return torch.tensor(taken, dtype=torch.long)


@register_method("mos", MosConfig)
class Mos(Adapter):
    """``delta(x) = s * B_l (A_l x)`` with ``A_l``, ``B_l`` gathered from the pools (and private rank vectors)."""

    capabilities = Capabilities(layers=frozenset({"linear"}), factorable=True)

    @classmethod
    def shared_state(cls, config: AdapterConfig, geometries: list[Geometry]) -> ShardPools:
        assert isinstance(config, MosConfig)
        return ShardPools(config, geometries)

    def __init__(self, geometry: Geometry, config: MosConfig, base: Backend, *, shared: ShardPools) -> None:
        super().__init__(geometry, config, base)
        self.hold_shared(shared)
        self.key_a, self.key_b = _pool_keys(config, geometry)
        self.scale = config.alpha / config.r
        n, p, d_in, d_out = config.shards, config.private_rank, geometry.d_in, geometry.d_out
        w = base.weight()
        if config.shared_rank:  # (shared_rank, shards) piece indices, saved with the adapter
            for name, key in (("mos_index_A", self.key_a), ("mos_index_B", self.key_b)):
                self.register_buffer(name, shared.draw(key, config.shared_rank * n).view(-1, n).to(w.device))
        if p:
            self.mos_private_A = nn.Parameter(torch.empty(p, d_in, device=w.device, dtype=w.dtype))  # (p, d_in)
            self.mos_private_B = nn.Parameter(torch.zeros(d_out, p, device=w.device, dtype=w.dtype))  # (d_out, p)
            nn.init.kaiming_uniform_(self.mos_private_A, a=math.sqrt(5))

    def assembled(self) -> tuple[Tensor, Tensor]:
        """``(A_l: (r, d_in), B_l: (d_out, r))``: private rank vectors first, then the pieces from the pools."""
        a_parts, b_parts = [], []
        if self.config.private_rank:
            a_parts.append(self.mos_private_A)
            b_parts.append(self.mos_private_B)
        if self.config.shared_rank:
            a_parts.append(self.shared.pools[self.key_a][self.mos_index_A].flatten(1))  # (shared_rank, d_in)
            b_parts.append(self.shared.pools[self.key_b][self.mos_index_B].flatten(1).t())  # (d_out, shared_rank)
        return torch.cat(a_parts), torch.cat(b_parts, dim=1)  # (r, d_in), (d_out, r)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        a, b = self.assembled()
        return (F.linear(F.linear(x.to(a.dtype), a), b) * self.scale).to(base_out.dtype)

    def factors(self) -> tuple[Tensor, Tensor]:
        a, b = self.assembled()
        return b * self.scale, a

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        b, a = self.factors()
        return b @ a  # (d_out, d_in)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())
