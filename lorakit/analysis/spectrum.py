"""Spectra of adapter updates: singular values, effective rank, and how much two updates share a subspace.

Every update is taken in the factor layout of :mod:`lorakit.init.layout` (``(d_out, d_in)`` for linear layers): an
adapter's ``factors()`` ``(up, down)`` with its scale folded in, or, for a method that is not exactly low rank, its
dense ``delta_weight``. Factored updates are never densified: with ``up = Q_u R_u`` and ``down^T = Q_d R_d``,

    up @ down = Q_u (R_u R_d^T) Q_d^T,

so the SVD of the small ``r x r`` core gives the singular values and vectors of the update.

- Effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007):
  ``erank = exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and ``H(p) = -sum_i p_i log p_i`` (``0 log 0 = 0``).
- Subspace similarity (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, Sec. 7.2, Eq. 4):
  ``phi = ||U_a^T U_b||_F^2 / min(k_a, k_b)`` over the top-k left singular vectors of each update, the mean squared
  cosine of their principal angles (Bjorck & Golub 1973: the cosines are the singular values of ``Q_a^T Q_b``), in
  ``[0, 1]``; 1 when one subspace contains the other, 0 when they are orthogonal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Union

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hosts.geometry import geometry_of
from ..hosts.host import HostLayer, hosts
from ..hosts.quantized import backend_for
from ..init.layout import base_matrix, precise, to_matrix
from ..inject import config_of
from ..methods.lora import LoraConfig
from ..targeting import find_targets

Update = Union[Tensor, tuple[Tensor, Tensor]]  # dense (d_out, d_in), or factors (d_out, r), (r, d_in)
_RANK_TOLERANCE = 1e-6  # singular values below this share of the largest count as zero


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's update: its singular values (descending), effective rank and Frobenius norm."""

    path: str
    singular_values: Tensor
    effective_rank: float
    frobenius_norm: float


def layer_update(host: HostLayer, name: str) -> Update:
    """Adapter ``name``'s update on ``host`` in factor layout: its factors, else its dense ``delta_weight``."""
    adapter = host.adapters[name]
    pair = adapter.factors()
    if pair is not None:
        return pair[0].detach(), pair[1].detach()  # (d_out, r), (r, d_in)
    return to_matrix(host.geometry, adapter.delta_weight(host.backend).detach())  # (d_out, d_in)


def layer_updates(model: nn.Module, name: str) -> dict[str, Update]:
    """Adapter ``name``'s update on every layer of ``model`` that has it, by layer path."""
    config_of(model, name)  # a clear error naming the model's adapters when there is no such adapter
    return {host.path: layer_update(host, name) for host in hosts(model) if name in host.adapters}


def weight_pairs(tuned: nn.Module, base: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``(W_base, W_tuned)`` (factor layout) on every linear layer of ``base`` but the output head whose weights
    differ in ``tuned``, a fully fine-tuned copy of ``base`` (layers left equal are left out)."""
    modules = dict(tuned.named_modules())
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for path, module in find_targets(base, LoraConfig(targets="all-linear")):
        other = modules.get(path)
        if other is None or type(other) is not type(module) or other.weight.shape != module.weight.shape:
            raise LorakitError(f"layer {path!r} of the base model has no counterpart of the same type and shape in "
                               "the fine-tuned model: compare a model only with the base it was fine-tuned from")
        geometry = geometry_of(module)
        w0, w = base_matrix(geometry, backend_for(module)), base_matrix(geometry, backend_for(other))  # (d_out, d_in)
        if not torch.equal(w0, w):
            out[path] = (w0, w)
    return out


def weight_differences(tuned: nn.Module, base: nn.Module) -> dict[str, Tensor]:
    """``W_tuned - W_base`` on the layers of :func:`weight_pairs`: the updates of a fully fine-tuned model."""
    return {path: w - w0 for path, (w0, w) in weight_pairs(tuned, base).items()}


def dense_update(update: Update) -> Tensor:
    """The update as a ``(d_out, d_in)`` matrix, in at least float32."""
    return precise(update) if isinstance(update, Tensor) else precise(update[0]) @ precise(update[1])


def _check_update(update: Update) -> None:
    if isinstance(update, Tensor):
        require(update.dim() == 2, "update", tuple(update.shape), "a dense update must be a (d_out, d_in) matrix")
    else:
        up, down = update
        require(up.dim() == 2 and down.dim() == 2 and up.shape[1] == down.shape[0], "update",
                (tuple(up.shape), tuple(down.shape)), "factors must be (d_out, r) and (r, d_in)")


def _core(update: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(Q_u, R_u R_d^T)``: ``up @ down = Q_u core Q_d^T`` with ``Q_d`` orthonormal, so the core has the update's
    singular values and ``Q_u`` times its left singular vectors are the update's."""
    q_up, r_up = torch.linalg.qr(precise(update[0]))  # (d_out, r'), (r', r)
    r_down = torch.linalg.qr(precise(update[1]).t(), mode="r").R  # (r'', r)
    return q_up, r_up @ r_down.t()  # core: (r', r'')


def singular_values(update: Update) -> Tensor:
    """The singular values of ``update``, descending (at most ``r`` of them for factors)."""
    _check_update(update)
    if isinstance(update, Tensor):
        return torch.linalg.svdvals(precise(update))
    return torch.linalg.svdvals(_core(update)[1])


def left_singular_vectors(update: Update, k: int) -> Tensor:
    """The top-``k`` left singular vectors of ``update`` with a non-zero singular value, ``(d_out, <= k)``."""
    _check_update(update)
    if isinstance(update, Tensor):
        u, s, _ = torch.linalg.svd(precise(update), full_matrices=False)  # (d_out, m), (m,)
    else:
        q_up, core = _core(update)
        core_u, s, _ = torch.linalg.svd(core, full_matrices=False)  # (r', m), (m,)
        u = q_up @ core_u  # (d_out, m)
    nonzero = int((s > s.max() * _RANK_TOLERANCE).sum()) if s.numel() and bool(s.max() > 0) else 0
    return u[:, :min(k, nonzero)]


def effective_rank(s: Tensor) -> float:
    """Roy & Vetterli's effective rank of singular values ``s``: ``exp`` of the entropy of ``s / sum(s)``; between 1
    and the number of non-zero values, and 0 for a zero matrix (whose rank is 0)."""
    require(s.dim() == 1 and bool((s >= 0).all()), "singular values", tuple(s.shape),
            "must be a vector of non-negative numbers")
    s = s.detach().double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def spectra(updates: Mapping[str, Update]) -> list[LayerSpectrum]:
    """A :class:`LayerSpectrum` per layer of ``updates``."""
    out = []
    for path, update in updates.items():
        s = singular_values(update).cpu()
        out.append(LayerSpectrum(path, s, effective_rank(s), float(s.double().pow(2).sum().sqrt())))
    return out


def spectrum_report(model: nn.Module, name: str) -> list[LayerSpectrum]:
    """The spectrum of adapter ``name``'s update on every layer of ``model`` that has it."""
    return spectra(layer_updates(model, name))


def principal_angles(u1: Tensor, u2: Tensor) -> Tensor:
    """The cosines of the principal angles between the column spaces of ``u1`` ``(d, k1)`` and ``u2`` ``(d, k2)``:
    the singular values of ``Q1^T Q2`` (both bases orthonormalised first), descending, ``min(k1, k2)`` of them."""
    require(u1.dim() == 2 and u2.dim() == 2 and u1.shape[0] == u2.shape[0], "bases",
            (tuple(u1.shape), tuple(u2.shape)), "must be (d, k1) and (d, k2) matrices of the same d")
    q1, q2 = torch.linalg.qr(precise(u1)).Q, torch.linalg.qr(precise(u2)).Q  # (d, k1), (d, k2)
    return torch.linalg.svdvals(q1.t() @ q2).clamp(0.0, 1.0)


def subspace_similarity(update_a: Update, update_b: Update, k: int) -> float:
    """Grassmann similarity of the top-``k`` left singular subspaces of two updates of one layer: the mean squared
    cosine of their principal angles, in ``[0, 1]`` (``nan`` when either update is zero: it has no subspace)."""
    require(isinstance(k, int) and k >= 1, "k", k, "must be an integer >= 1")
    u_a, u_b = left_singular_vectors(update_a, k), left_singular_vectors(update_b, k)  # (d_out, k_a), (d_out, k_b)
    require(u_a.shape[0] == u_b.shape[0], "updates", (u_a.shape[0], u_b.shape[0]),
            "must have the same number of output rows (updates of one layer)")
    if min(u_a.shape[1], u_b.shape[1]) == 0:
        return float("nan")
    return float(principal_angles(u_a, u_b).pow(2).mean())


def adapter_similarity(model: nn.Module, name_a: str, name_b: str, k: int) -> dict[str, float]:
    """:func:`subspace_similarity` of adapters ``name_a`` and ``name_b`` on every layer that has both."""
    a, b = layer_updates(model, name_a), layer_updates(model, name_b)
    return {path: subspace_similarity(a[path], b[path], k) for path in a if path in b}
