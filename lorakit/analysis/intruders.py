"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024).

For a layer with pre-trained weight ``W0 = U0 S0 V0^T`` and tuned weight ``W = W0 + dW = U S V^T``,
the ``i``-th of the top-``k`` left singular vectors of ``W`` is an *intruder dimension* when

    max_j |cos(u_i, u0_j)| = max_j |u_i^T u0_j| < epsilon

over every left singular vector ``u0_j`` of ``W0`` (those with a non-zero singular value: the others of a
rank-deficient ``W0`` are arbitrary). LoRA creates them; full fine-tuning does not (METHODS.md entry 83).

Mitigation (the paper's; PEFT's ``reduce_intruder_dimension``): scale the intruders' singular values by ``lambda``,

    W' = W - (1 - lambda) sum_{i in intruders} s_i u_i v_i^T,

and re-factorise ``dW' = W' - W0`` into a rank-``r`` LoRA by its truncated SVD (``up = U_r S_r``, ``down = V_r^T``).

:func:`model_intruders` runs the diagnostic on every adapted layer of a model (``W = W0 + delta``) or on every linear
layer of a fully fine-tuned model against its base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hosts.host import HostLayer, hosts
from ..init.layout import base_matrix, precise
from ..inject import config_of
from .spectrum import dense_update, layer_update, weight_pairs

_RANK_TOLERANCE = 1e-6  # singular values below this share of the largest count as zero
_MATCH_TOLERANCE = 1e-4  # relative difference of singular values allowed between a report and the matrix it is for


@dataclass(frozen=True)
class IntruderReport:
    """Among the top-``k`` left singular vectors of ``W``: the positions of the intruders, every vector's largest
    ``|cos|`` with a singular vector of ``W0``, and the top-``k`` singular values of ``W``."""

    indices: Tensor  # (n_intruders,) int64, ascending
    max_cosines: Tensor  # (k,)
    singular_values: Tensor  # (k,)

    @property
    def count(self) -> int:
        return int(self.indices.numel())


@dataclass(frozen=True)
class ModelIntruders:
    """An :class:`IntruderReport` per layer."""

    layers: dict[str, IntruderReport]

    @property
    def counts(self) -> dict[str, int]:
        return {path: report.count for path, report in self.layers.items()}

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _check_pair(w0: Tensor, w: Tensor) -> None:
    require(w0.dim() == 2 and w0.shape == w.shape, "weights", (tuple(w0.shape), tuple(w.shape)),
            "w0 and w must be (d_out, d_in) matrices of the same shape")


def intruder_dimensions(w0: Tensor, w: Tensor, k: int = 10, epsilon: float = 0.5) -> IntruderReport:
    """The intruder dimensions of the tuned weight ``w`` ``(d_out, d_in)`` against the base weight ``w0``."""
    _check_pair(w0, w)
    require(isinstance(k, int) and k >= 1, "k", k, "must be an integer >= 1 (how many top singular vectors to test)")
    require(0.0 < epsilon <= 1.0, "epsilon", epsilon, "must be in (0, 1] (a threshold on |cosine|)")
    u0, s0, _ = torch.linalg.svd(precise(w0), full_matrices=False)  # (d_out, m), (m,)
    basis = u0[:, s0 > s0.max() * _RANK_TOLERANCE] if s0.numel() and bool(s0.max() > 0) else u0[:, :0]
    u, s, _ = torch.linalg.svd(precise(w), full_matrices=False)
    top = u[:, :k]  # (d_out, k')
    if basis.shape[1]:
        cosines = (top.t() @ basis).abs().amax(dim=1)  # (k',)
    else:
        cosines = torch.zeros(top.shape[1], dtype=top.dtype, device=top.device)  # a zero W0 has no directions
    indices = torch.nonzero(cosines < epsilon).flatten()
    return IntruderReport(indices.cpu(), cosines.cpu(), s[:k].cpu())


def mitigate(w0: Tensor, w: Tensor, report: IntruderReport, scale: float = 0.0,
             rank: int | None = None) -> tuple[Tensor, Tensor]:
    """LoRA factors ``(up, down)`` of ``dW' = W' - W0``, where ``W'`` is ``w`` with the singular values of the
    intruders in ``report`` (computed for ``w0``, ``w``) multiplied by ``scale`` (0: removed, 1: kept). ``rank``:
    that of the new LoRA (default: the rank of ``w - w0``); the truncated SVD is exact when ``dW'`` has that rank."""
    _check_pair(w0, w)
    require(0.0 <= scale <= 1.0, "scale", scale, "must be in [0, 1] (the share of each intruder kept)")
    require(rank is None or (isinstance(rank, int) and rank >= 1), "rank", rank, "must be None or an integer >= 1")
    w0, w = precise(w0), precise(w)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (d_out, m), (m,), (m, d_in)
    k = report.singular_values.numel()
    if k > s.numel() or not torch.allclose(s[:k].cpu(), report.singular_values.to(s.dtype), rtol=_MATCH_TOLERANCE,
                                            atol=_MATCH_TOLERANCE * float(s.max())):
        raise LorakitError("the intruder report was computed for another matrix: its singular values differ from "
                           "w's; pass the w0, w that intruder_dimensions was given")
    idx = report.indices.to(u.device)
    delta = w - w0 - (1.0 - scale) * (u[:, idx] * s[idx]) @ vh[idx]  # (d_out, d_in)
    if rank is None:
        original = torch.linalg.svdvals(w - w0)
        rank = max(1, int((original > original.max() * _RANK_TOLERANCE).sum()))
    du, ds, dvh = torch.linalg.svd(delta, full_matrices=False)
    return du[:, :rank] * ds[:rank], dvh[:rank]  # (d_out, r), (r, d_in)


def _adapted_pair(host: HostLayer, name: str) -> tuple[Tensor, Tensor]:
    """``(W0, W0 + delta)`` of adapter ``name`` on ``host`` (factor layout)."""
    if name in host.merged:
        raise LorakitError(f"adapter {name!r} is merged into {host.path!r}, so its base weight is not W0; unmerge "
                           "it before looking for intruder dimensions")
    if name in host.rewriters:
        raise LorakitError(f"adapter {name!r} rewrote the base of {host.path!r} (a residual initialisation such as "
                           "PiSSA), so W0 is not stored; export it with lorakit.export_lora and analyse the export")
    w0 = base_matrix(host.geometry, host.backend)  # (d_out, d_in)
    return w0, w0 + dense_update(layer_update(host, name))


def model_intruders(model: nn.Module, name: str | None = None, base_model: nn.Module | None = None, k: int = 10,
                    epsilon: float = 0.5) -> ModelIntruders:
    """Intruder dimensions of every layer of ``model`` that adapter ``name`` adapts (``W = W0 + delta``), or, with
    ``base_model``, of every linear layer of the fully fine-tuned ``model`` that differs from ``base_model``'s."""
    require((name is None) != (base_model is None), "name / base_model", (name, type(base_model).__name__),
            "give an adapter name (an adapter on the model) or a base model (a fully fine-tuned model), not both")
    if base_model is not None:
        pairs: Iterable[tuple[str, tuple[Tensor, Tensor]]] = weight_pairs(model, base_model).items()
    else:
        config_of(model, name)  # a clear error naming the model's adapters when there is no such adapter
        pairs = ((h.path, _adapted_pair(h, name)) for h in hosts(model) if name in h.adapters)  # one layer at a time
    return ModelIntruders({path: intruder_dimensions(w0, w, k, epsilon) for path, (w0, w) in pairs})
