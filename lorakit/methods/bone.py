"""Bone / MiSS and Bat: block weight updates (Kang & Yin, 2024, "Bone: Block Affine Transformation as Parameter
Efficient Fine-tuning Methods for Large Language Models"; METHODS.md entry 10; PEFT's MiSS is the peer).
Default ``variant="miss"``::

    dW[:, j*r:(j+1)*r] = M^T  for every input block j,    M: (r, d_out),  zero at init

so ``dW x = M^T sum_j x_j`` with ``x_j`` the ``r``-sized chunks of ``x`` (the last one zero-padded when ``r`` does
not divide ``d_in``, as PEFT does): one reduction over chunks and one ``(r -> d_out)`` product, never ``dW``.
The update is exactly ``M^T S`` with ``S: (r, d_in)`` the tiled identity, so :meth:`Bone.factors` is exact.

``variant="mini"`` (PEFT's ``init_weights="mini"``) trains only ``M: (r, mini_r)`` and repeats it across the
``d_out / mini_r`` output groups.

``variant="bat"`` (PEFT's ``init_weights="bat"``) is the paper's "weight guide", the block affine transformation:
split ``W0`` into ``r x r`` blocks ``W_ij`` (output block-row ``i``, input block-column ``j``) and train one
``M_i: (r, r)`` per output block-row (``miss_block: (d_out / r, r, r)``, zero at init)::

    dW_ij = W_ij M_i + M_i          i.e.  W'_ij = W_ij (I + M_i) + M_i

Assumptions (as in PEFT): ``r`` divides both ``d_in`` and ``d_out``; ``mini_r`` is unused and no dropout is applied
(the update transforms the weight and is applied as ``x @ dW^T``, a ``d_out x d_in`` temporary per call); ``dW`` is
built from the layer's current base weight (dequantized by the backend). ``dW`` depends on ``W0``, which the host's
additive merge protocol does not pass to :meth:`Bone.merge_delta`: :meth:`Bone.merge_scale` (called by the host on
the unmerged base at merge time) computes it, and the host's unmerge subtracts that same cached ``dW``, so unmerging
restores ``W0`` exactly without PEFT's ``(I + M_i)^-1`` (which would also be wrong with other adapters merged); the
cost is one float32 ``dW`` per layer held while merged. A host hook for ``W0``-dependent updates would remove it.

The default ``r`` is 8 (PEFT's is 64) so that the default config fits small layers; ``r <= d_in`` is required as in
PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities, register_method

BONE_VARIANTS = ("miss", "mini", "bat")


@dataclass(frozen=True)
class BoneConfig(AdapterConfig):
    """Config of a Bone / MiSS adapter.

    Attributes:
        r: block size (the shared block is ``d_out x r``); at most ``d_in`` of every targeted layer.
        variant: ``"miss"`` (one ``(r, d_out)`` block), ``"mini"`` (an ``(r, mini_r)`` block repeated over outputs)
            or ``"bat"`` (block affine ``dW_ij = W_ij M_i + M_i``; ``r`` must divide ``d_in`` and ``d_out``).
        mini_r: output-group size of the ``"mini"`` variant; must divide ``d_out``.
        dropout: dropout probability on the adapter's input (must be 0 for ``"bat"``, which PEFT applies none in).
    """

    r: int = 8
    variant: str = "miss"
    mini_r: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and self.r >= 1, "r", self.r, "must be a positive integer")
        require(self.variant in BONE_VARIANTS, "variant", self.variant, f"must be one of {', '.join(BONE_VARIANTS)}")
        require(isinstance(self.mini_r, int) and self.mini_r >= 1, "mini_r", self.mini_r, "must be a positive integer")
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        require(self.variant != "bat" or self.dropout == 0.0, "dropout", self.dropout,
                "must be 0 with variant='bat' (the update transforms the weight; PEFT applies no dropout there)")


@register_method("bone", BoneConfig)
class Bone(Adapter):
    """MiSS: ``delta(x) = (sum of x's r-chunks) @ M`` with ``M`` shared by every input block; Bat: ``x @ dW^T``
    with ``dW_ij = W_ij M_i + M_i`` built from the base weight."""

    capabilities = Capabilities(layers=frozenset({"linear"}), factorable=True)

    def __init__(self, geometry: Geometry, config: BoneConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        r, d_in, d_out = config.r, geometry.d_in, geometry.d_out
        require(r <= d_in, "r", r, f"must be <= the layer's d_in ({d_in})")
        mini, bat = config.variant == "mini", config.variant == "bat"
        require(not mini or d_out % config.mini_r == 0, "mini_r", config.mini_r,
                f"must divide the layer's d_out ({d_out})")
        require(not bat or (d_in % r == 0 and d_out % r == 0), "r", r,
                f"must divide d_in ({d_in}) and d_out ({d_out}) with variant='bat' (W0 splits into r x r blocks)")
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        w = base.weight()
        shape = (d_out // r, r, r) if bat else (r, config.mini_r if mini else d_out)
        self.miss_block = nn.Parameter(torch.zeros(shape, device=w.device, dtype=w.dtype))
        if bat:  # W0-dependent, not low rank
            self.capabilities = Capabilities(layers=self.capabilities.layers, factorable=False)
        self._merged_bat: tuple[Tensor, tuple[int, int]] | None = None  # (dW at merge, base version at merge)

    def bat_delta(self, weight: Tensor) -> Tensor:
        """Bat's ``dW`` for base weight ``weight: (d_out, d_in)``: block ``(i, j)`` is ``W_ij M_i + M_i``."""
        r, m = self.config.r, self.miss_block  # m: (d_out / r, r, r), M_i = m[i]
        d_out, d_in = weight.shape
        blocks = weight.to(m.dtype).reshape(d_out // r, r, d_in // r, r).transpose(1, 2)  # [i, j] = W_ij
        delta = blocks @ m.unsqueeze(1) + m.unsqueeze(1)  # (d_out / r, d_in / r, r, r)
        return delta.transpose(1, 2).reshape(d_out, d_in)

    def block(self) -> Tensor:  # (r, d_out)
        if self.config.variant == "mini":
            return self.miss_block.repeat(1, self.geometry.d_out // self.config.mini_r)
        return self.miss_block

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        if self.config.variant == "bat":
            return F.linear(x.to(self.miss_block.dtype), self.bat_delta(base.weight())).to(base_out.dtype)
        r = self.config.r
        x = self.dropout(x.to(self.miss_block.dtype))
        if x.shape[-1] % r:  # zero-pad the last block (a copy, so only when needed)
            x = F.pad(x, (0, -x.shape[-1] % r))  # (..., n_blocks * r)
        chunks = x.reshape(*x.shape[:-1], -1, r).sum(-2)  # (..., r)
        return (chunks @ self.block()).to(base_out.dtype)  # (..., d_out)

    def tiling(self) -> Tensor:
        """``S: (r, d_in)`` with ``S[c, j*r + c] = 1``: the input-side factor of ``dW = M^T S``."""
        r, d_in = self.config.r, self.geometry.d_in
        eye = torch.eye(r, device=self.miss_block.device, dtype=self.miss_block.dtype)
        return eye.repeat(1, -(-d_in // r))[:, :d_in]

    def delta_weight(self, base: Backend) -> Tensor:
        if self.config.variant == "bat":
            return self.bat_delta(base.weight()).float()
        return super().delta_weight(base)

    def merge_scale(self, base: Backend) -> Tensor | None:
        """Bat: the host calls this on the unmerged base just before merging; keep ``dW(W0)`` for the merge and the
        matching unmerge (no per-unit factor either way)."""
        if self.config.variant == "bat":
            with torch.no_grad():
                self._merged_bat = (self.bat_delta(base.weight()).float(), base.version())
            self.__dict__["_bat_base"] = base
        return None

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        if self.config.variant != "bat":
            return self.block().t() @ self.tiling()  # (d_out, d_in)
        require(self._merged_bat is not None, "variant", "bat",
                "has a W0-dependent update: merge it through lorakit.merge (use delta_weight(base) otherwise)")
        delta, version = self._merged_bat
        if self.__dict__["_bat_base"].version() != version:  # the base changed since: this is the unmerge
            self._merged_bat = None
        return delta

    def factors(self) -> tuple[Tensor, Tensor] | None:
        if self.config.variant == "bat":
            return None
        return self.block().t(), self.tiling()

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"miss_block": self.miss_block}
