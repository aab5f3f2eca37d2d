"""LoCA (Du et al., 2025; METHODS.md entry 5): a sparse spectrum in the 2-D DCT domain.

    dW = alpha * iDCT2(S) = alpha * C_out^T S C_in,     S: (d_out, d_in) with n non-zero coefficients s_k at (i_k, j_k)

``C`` is the orthonormal DCT-II matrix (``C[k, t] = sqrt(2/N) w_k cos(pi (2t + 1) k / 2N)``, ``w_0 = 1/sqrt 2``), so
``||dW||_F = alpha ||S||_F`` and a one-hot spectrum gives the outer product of two DCT basis vectors. The ``n``
coefficient values are trained; they start at zero, so ``dW = 0`` at init.

Applied in the spectral domain without any ``d x d`` transform: ``dW = sum_k s_k c_{i_k} c_{j_k}^T`` needs only the
``n`` basis vectors at the selected locations (rebuilt from the integer locations, the angles reduced exactly in
integers), so ``dW x = alpha C_out[I]^T (s * (C_in[J] x))`` costs ``O(n (d_in + d_out))`` per token and
:meth:`Loca.factors` is exact (rank ``<= n``).

Locations: ``n`` distinct positions drawn from ``seed`` at adapt time and saved with the adapter (integer buffer
``loca_locations``). While training, every ``relocate_every`` steps in the first ``relocate_fraction`` of training,
:class:`LocaLocations` moves them by LoCA's finite-difference location gradient: on a
probing step, zero-valued *probe* coefficients sit at each coefficient's location and its four neighbours, so their
gradients are ``alpha * DCT2(dL/dW)`` there (exactly, for the cost of a rank-``5n`` product); moving ``s_k`` from
``(i, j)`` to a neighbour changes the loss by ``s_k (g_neighbour - g_here)`` to first order, and each coefficient
takes the neighbour with the most negative change (one free cell each, best change first).

Assumed (the paper's schedule and step rule are not in the abstract): one-cell moves to the steepest of the four
neighbours, locations learned during the first half of training by default, then frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..hosts.host import adapters_named
from .base import Adapter, Capabilities, register_method


@dataclass(frozen=True)
class LocaConfig(AdapterConfig):
    """Config of a LoCA adapter.

    Attributes:
        n: number of learned DCT coefficients per layer (at most ``d_out * d_in``).
        alpha: scale of the update.
        seed: seed of the random coefficient locations.
        relocate_every: move the locations every this many optimizer steps (0: keep them where they started).
        relocate_fraction: the share of training (from the start) during which locations move.
    """

    n: int = 64
    alpha: float = 1.0
    seed: int = 0
    relocate_every: int = 10
    relocate_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.n, int) and self.n >= 1, "n", self.n, "must be a positive integer")
        require(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", self.alpha, "must be > 0")
        require(isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        require(isinstance(self.relocate_every, int) and self.relocate_every >= 0, "relocate_every",
                self.relocate_every, "must be a non-negative integer")
        require(0.0 <= self.relocate_fraction <= 1.0, "relocate_fraction", self.relocate_fraction, "must be in [0, 1]")


def dct_basis(freqs: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Rows ``freqs`` of the orthonormal DCT-II matrix of ``size``: ``(len(freqs), size)``."""
    t = torch.arange(size, device=freqs.device)
    phase = ((2 * t[None, :] + 1) * freqs[:, None]) % (4 * size)  # exact integer angle reduction
    rows = torch.cos(phase.double() * (math.pi / (2 * size))) * math.sqrt(2.0 / size)
    rows[freqs == 0] /= math.sqrt(2.0)
    return rows.to(dtype)

_MOVES = torch.tensor([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])  # here, then the four neighbours (row, col)


@register_method("loca", LocaConfig)
class Loca(Adapter):
    """``delta(x) = alpha C_out[I]^T (s * C_in[J] x)``: ``n`` DCT coefficients at fixed locations ``(I, J)``."""

    capabilities = Capabilities(layers=frozenset({"linear"}), factorable=True)

    def __init__(self, geometry: Geometry, config: LocaConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        numel = geometry.d_out * geometry.d_in
        require(config.n <= numel, "n", config.n, f"must be <= d_out * d_in of every targeted layer (one has {numel})")
        flat = torch.randperm(numel, generator=torch.Generator().manual_seed(config.seed))[: config.n]
        w = base.weight()
        locations = torch.stack((flat // geometry.d_in, flat % geometry.d_in), 1)  # (n, 2): (i_k, j_k)
        self.register_buffer("loca_locations", locations.to(w.device))
        self.loca_spectrum = nn.Parameter(torch.zeros(config.n, device=w.device, dtype=w.dtype))  # s_k
        self._probe: tuple[Tensor, Tensor] | None = None  # (locations (n, 5, 2), zero values (n, 5)) while probing

    def bases(self, locations: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``C_out[I]: (m, d_out)`` and ``C_in[J]: (m, d_in)``, the basis vectors at ``locations`` (default: own)."""
        rows, cols = (self.loca_locations if locations is None else locations).unbind(-1)
        dtype = self.loca_spectrum.dtype
        return dct_basis(rows, self.geometry.d_out, dtype), dct_basis(cols, self.geometry.d_in, dtype)

    def _sparse_idct(self, x: Tensor, locations: Tensor | None, values: Tensor) -> Tensor:
        c_out, c_in = self.bases(locations)
        h = F.linear(x.to(c_in.dtype), c_in) * (values * self.config.alpha)  # (..., m)
        return F.linear(h, c_out.t())  # (..., d_out)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        out = self._sparse_idct(x, None, self.loca_spectrum)
        if self._probe is not None:  # zero-valued: changes nothing but collects the spectrum's gradient there
            locations, values = self._probe
            out = out + self._sparse_idct(x, locations.reshape(-1, 2), values.reshape(-1))
        return out.to(base_out.dtype)

    @property
    def probing(self) -> bool:
        return self._probe is not None

    def start_probe(self) -> None:
        """Put zero probes at every coefficient's location and its four neighbours (clamped to the matrix)."""
        limit = torch.tensor([self.geometry.d_out - 1, self.geometry.d_in - 1], device=self.loca_locations.device)
        nb = (self.loca_locations[:, None, :] + _MOVES.to(limit.device)).clamp(min=torch.zeros_like(limit), max=limit)
        values = torch.zeros(nb.shape[:2], device=self.loca_spectrum.device, dtype=self.loca_spectrum.dtype)
        self._probe = (nb, values.requires_grad_())  # (n, 5, 2), (n, 5)

    @torch.no_grad()
    def relocate(self) -> int:
        """End probing: move coefficients one cell along the steepest first-order descent; returns how many moved."""
        assert self._probe is not None, "start_probe() first"
        nb, values = self._probe
        self._probe = None
        if values.grad is None:  # the adapter took no part in this step
            return 0
        grads = values.grad  # alpha * dL/dS at [here, 4 neighbours]
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # probes are not DDP parameters:
            torch.distributed.all_reduce(grads)  # every rank must make the same moves
        change, which = (self.loca_spectrum.detach()[:, None] * (grads - grads[:, :1])).min(1)  # (n,)
        target = nb[torch.arange(len(nb), device=nb.device), which]  # (n, 2)
        stride = torch.tensor([self.geometry.d_in, 1], device=nb.device)
        flat_now, flat_target = (self.loca_locations * stride).sum(1), (target * stride).sum(1)  # row-major ids
        free = (change < 0) & ~torch.isin(flat_target, flat_now)
        movers = torch.nonzero(free).squeeze(1)
        if movers.numel() == 0:
            return 0
        movers = movers[torch.argsort(change[movers])]  # best change first; one mover per free cell
        _, slot = torch.unique(flat_target[movers], return_inverse=True)
        first = torch.full((int(slot.max()) + 1,), len(movers), device=nb.device)
        first = first.scatter_reduce(0, slot, torch.arange(len(movers), device=nb.device), "amin")
        movers = movers[first]
        self.loca_locations[movers] = target[movers]
        return len(movers)

    def factors(self) -> tuple[Tensor, Tensor]:
        c_out, c_in = self.bases()
        return c_out.t() * (self.loca_spectrum * self.config.alpha), c_in

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        b, a = self.factors()
        return b @ a

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"loca_spectrum": self.loca_spectrum}


class LocaLocations(TrainingHook):
    """LoCA's alternating coefficient / location updates for adapter ``name``: on every ``every``-th optimizer step
    before ``until``, each layer probes the spectrum's gradient around its coefficients during that step's passes
    (:meth:`Loca.start_probe`) and, right before the optimizer update, moves each coefficient to the neighbouring
    frequency with the steepest first-order loss decrease (:meth:`Loca.relocate`). The locations live in the adapter
    (saved with it), so the hook keeps no state."""

    def __init__(self, name: str = "default", every: int = 10, until: int | None = None) -> None:
        require(isinstance(every, int) and every >= 1, "every", every, "must be a positive integer")
        self.name, self.every, self.until = name, every, until
        self.moved = 0  # coefficients moved so far (for logging and tests)

    def before_forward(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0 and (self.until is None or step < self.until):
            for _, adapter in adapters_named(model, self.name, Loca):
                adapter.start_probe()

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for _, adapter in adapters_named(model, self.name, Loca):
            if adapter.probing:
                self.moved += adapter.relocate()


@training_rule("loca")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, LocaConfig)
    if config.relocate_every == 0:
        return []
    return [LocaLocations(name, config.relocate_every, int(steps * config.relocate_fraction))]
