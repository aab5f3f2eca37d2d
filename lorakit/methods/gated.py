"""Gated low-rank update ``ΔW = s · B diag(g) A``: the one parametrisation behind SoRA, AdaLoRA and IncreLoRA.

    h = W0 x + s · B (g ⊙ A dropout(x))         A: (r, d_in), g: (r,), B: (d_out, r)

SoRA (METHODS.md entry 27) calls ``g`` a gate and drives it to exact zeros with a proximal L1 step; AdaLoRA
(Zhang et al., 2023) and IncreLoRA (entry 29) call it the singular values ``Λ`` of ``P Λ Q`` and keep ``P = B``,
``Q = A`` near-orthogonal with a regulariser. One class serves all three because the forward pass, merging and
export are identical; they differ only in initialisation and in the training hooks that prune, mask or grow
ranks (:mod:`lorakit.rank`). ``g`` is stored as ``lora_E`` (PEFT AdaLoRA's name for ``Λ``).

Ranks change during training, so a layer's rank is a property of its tensors, not of the config: the scale
``s = alpha / r`` is fixed when the layer's adapter is built and stored with it (``lora_scale``), so pruning or
growing never changes it; the per-layer ranks are recorded in ``rank_pattern`` (PEFT's rule; 0 allowed: a layer
whose every rank was pruned adds nothing) so a saved adapter rebuilds with the right shapes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_patterns, pattern_value, require_rank_and_alpha
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities

GATED_INITS = ("lora", "svd")


@dataclass(frozen=True)
class GatedLoraConfig(AdapterConfig):
    """Fields shared by the gated methods.

    Attributes:
        r: starting rank of every layer (``rank_pattern`` overrides it per module).
        alpha: the scale is ``alpha / r`` with the layer's starting rank (kept when ranks change).
        dropout: dropout probability on the adapter's input.
        init: ``"lora"`` (Kaiming-uniform ``A``, ``B = 0``, ``g = 1``: SoRA) or ``"svd"`` (``A, B ~ N(0, 0.02²)``,
            ``g = 0``: AdaLoRA / IncreLoRA, as PEFT's AdaLoRA).
        rank_pattern: per-module rank by regex on the module name (PEFT's rule); the rank hooks write the exact
            paths of the layers whose rank they changed here.
    """

    default_init: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init: str = ""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init:
            object.__setattr__(self, "init", self.default_init)
        require_rank_and_alpha(self.r, self.alpha)
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        require(self.init in GATED_INITS, "init", self.init, f"must be one of {GATED_INITS}")
        check_patterns("rank_pattern", self.rank_pattern)
        for key, r in self.rank_pattern.items():
            require(isinstance(r, int) and r >= 0, f"rank_pattern[{key!r}]", r, "must be an integer >= 0")

    def rank_of(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def for_module(self, module_name: str) -> "GatedLoraConfig":
        """One layer's config: ``r`` (the scale's denominator) is its rank, or 1 at rank 0, and the rank itself,
        which may be 0, travels as ``rank_pattern[""]`` (the adapter reads it there)."""
        r = self.rank_of(module_name)
        return self if r == self.r and not self.rank_pattern else self.replace(r=max(r, 1), rank_pattern={"": r})

    def with_ranks(self, ranks: Mapping[str, int]) -> "GatedLoraConfig":
        """This config with the exact module paths in ``ranks`` pinned to those ranks (ahead of older patterns)."""
        pinned = {re.escape(path): int(r) for path, r in ranks.items()}
        return self.replace(rank_pattern={**pinned, **{k: v for k, v in self.rank_pattern.items() if k not in pinned}})


class GatedLora(Adapter):
    """``delta(x) = s · B (g ⊙ A x)``; ranks can be pruned (:meth:`resized` with ``keep``) and grown (``extra``)."""

    capabilities = Capabilities(factorable=True)
    RANK_DIMS: ClassVar[dict[str, int]] = {"lora_A": 0, "lora_B": 1, "lora_E": 0}  # the rank axis of each tensor

    def __init__(self, geometry: Geometry, config: GatedLoraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        r = config.rank_pattern.get("", config.r)  # for_module puts this layer's rank under ""
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(geometry.down_shape(r)))  # (r, d_in[, *kernel])
        self.lora_B = nn.Parameter(torch.empty(geometry.up_shape(r)))  # (d_out, r[, 1...])
        self.lora_E = nn.Parameter(torch.empty(r))  # (r,)
        self.register_buffer("lora_scale", torch.tensor(config.alpha / config.r))
        self._init(self.lora_A, self.lora_B, self.lora_E, config.init)
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    @property
    def r(self) -> int:
        return self.lora_E.shape[0]

    @staticmethod
    @torch.no_grad()
    def _init(a: Tensor, b: Tensor, e: Tensor, init: str) -> None:
        if a.numel() == 0:  # a layer at rank 0 (rebuilt from a file)
            return
        if init == "lora":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
            nn.init.ones_(e)
        else:
            nn.init.normal_(a, std=0.02)
            nn.init.normal_(b, std=0.02)
            nn.init.zeros_(e)

    def gated_b(self) -> Tensor:  # (d_out, r[, 1...]): B diag(g)
        return self.lora_B * self.lora_E.reshape(1, -1, *([1] * (self.lora_B.dim() - 2)))

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        if x.is_floating_point():  # embeddings take token ids
            x = self.dropout(x.to(self.lora_A.dtype))
        h = self.geometry.down(x, self.lora_A)  # (..., r)
        return (self.geometry.up(h, self.gated_b()) * self.lora_scale).to(base_out.dtype)  # (..., d_out)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return self.geometry.compose(self.gated_b(), self.lora_A) * self.lora_scale

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.geometry.factored(self.gated_b() * self.lora_scale, self.lora_A)  # a layer may have rank 0

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def up_projections(self) -> dict[str, nn.Parameter]:
        return {"lora_B": self.lora_B}

    @torch.no_grad()
    def resized(self, keep: Tensor, extra: int = 0) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Keep ranks ``keep`` (in that order) and append ``extra`` new ones; returns ``{name: (old, new)}``.

        New ranks start as the ``"svd"`` init does (``g = 0``: the output does not change, IncreLoRA). The caller
        moves the optimizer to the new tensors (:func:`lorakit.rank.ops.resize_ranks`).
        """
        keep = keep.to(self.lora_E.device)
        out = {}
        fresh = [torch.empty(self._shape(n, extra), dtype=self.lora_E.dtype, device=self.lora_E.device)
                 for n in ("lora_A", "lora_B", "lora_E")]
        self._init(*fresh, "svd")
        for (name, dim), new in zip(self.RANK_DIMS.items(), fresh):
            old = getattr(self, name)
            param = nn.Parameter(torch.cat([old.index_select(dim, keep), new], dim=dim),
                                 requires_grad=old.requires_grad)
            setattr(self, name, param)
            out[name] = (old, param)
        return out

    def _shape(self, name: str, r: int) -> tuple[int, ...]:
        shape = list(getattr(self, name).shape)
        shape[self.RANK_DIMS[name]] = r
        return tuple(shape)

    @torch.no_grad()
    def reshape_in_place(self, r: int) -> None:
        """Give the existing tensors rank ``r`` (contents undefined) keeping their identity: on resumption the
        optimizer already holds them, and the checkpoint fills the values."""
        for name in self.RANK_DIMS:
            param = getattr(self, name)
            param.data = torch.zeros(self._shape(name, r), dtype=param.dtype, device=param.device)
