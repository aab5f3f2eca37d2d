"""Merge rules on one layer's updates, as pure functions in a registry.

An update is ``delta_i = up_i @ down_i`` (``up (d_out, r_i)``, ``down (r_i, d_in)``, the scale folded in: an
adapter's ``factors()``) or a dense ``(d_out, d_in)`` matrix (``delta_weight`` of any other method). Every rule
combines updates ``delta_i`` with weights ``w_i`` (negative: task negation) and returns factors ``(up, down)`` --
exact ones where the rule is exactly low rank -- or a dense matrix, which :func:`refactor` brings to a rank:

* ``cat`` -- ``[w_1 up_1 .. w_n up_n] [down_1; ..; down_n] = sum_i w_i delta_i``, exact, rank ``sum_i r_i``
  (PEFT's ``linear`` instead sums the ups and downs separately: ``(sum_i w_i up_i)(sum_i down_i)`` adds the cross
  terms ``up_i down_j``);
* ``linear`` -- task arithmetic, ``sum_i w_i delta_i`` (kept as the ``cat`` factors when every update is factored);
* ``svd`` -- the same, truncated to the target rank or energy (the best approximation in Frobenius norm);
* ``ties`` -- TIES-Merging (Yadav et al. 2023): keep the ``density`` largest magnitudes of each ``w_i delta_i``,
  elect each entry's sign as that of their sum, average the kept entries agreeing with it;
* ``dare_linear`` / ``dare_ties`` -- DARE (Yu et al. 2024): drop each entry with probability ``1 - density`` and
  rescale the kept ones by ``1 / density`` (seeded), then ``linear`` / ``ties``;
* ``magnitude_prune`` -- keep the ``density`` largest magnitudes of each update, then ``linear``;
* ``lego`` -- LoRA-LEGO: the weighted rank-wise units of all updates clustered into ``units`` merged units.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

from ..errors import LorakitError, require
from ..registry import Registry
from .lego import lego_merge

Factors = tuple[Tensor, Tensor]
Update = Union[Factors, Tensor]
Rule = Callable[..., Update]
MERGE_RULES: Registry[Rule] = Registry("merge rule")


def dense(update: Update) -> Tensor:
    """The update as a float32 ``(d_out, d_in)`` matrix."""
    return update.float() if isinstance(update, Tensor) else update[0].float() @ update[1].float()


def factored(update: Update) -> Factors:
    """The update as factors: exact (an SVD at full rank of a dense one, its zero directions dropped)."""
    if not isinstance(update, Tensor):
        return update[0].float(), update[1].float()
    u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
    keep = s > s.max() * 1e-7 if s.numel() else s.bool()
    return u[:, keep] * s[keep], vh[keep]


def refactor(update: Update, rank: int | None = None, energy: float | None = None) -> Factors:
    """Truncated SVD of ``update`` to ``rank`` and/or the fewest directions keeping ``energy`` of its squared
    Frobenius norm (both ``None``: exact). Factors are never densified: ``up = Q_u R_u``, ``down^T = Q_d R_d``, and
    the SVD of the small core ``R_u R_d^T`` gives that of ``up @ down``."""
    if rank is None and energy is None:
        return factored(update)
    if isinstance(update, Tensor):
        u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
    else:
        q_up, r_up = torch.linalg.qr(update[0].float())
        q_down, r_down = torch.linalg.qr(update[1].float().t())
        core_u, s, core_vh = torch.linalg.svd(r_up @ r_down.t(), full_matrices=False)
        u, vh = q_up @ core_u, (q_down @ core_vh.t()).t()
    keep = s.numel() if rank is None else min(rank, s.numel())
    if energy is not None:
        cumulative = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
        keep = min(keep, int((cumulative < energy).sum()) + 1)
    return u[:, :keep] * s[:keep], vh[:keep]


@MERGE_RULES.decorator("cat")
def cat(updates: Sequence[Update], weights: Sequence[float]) -> Factors:
    pairs = [factored(u) for u in updates]
    return (torch.cat([w * up for (up, _), w in zip(pairs, weights)], dim=1),
            torch.cat([down for _, down in pairs], dim=0))


@MERGE_RULES.decorator("linear")
def linear(updates: Sequence[Update], weights: Sequence[float]) -> Update:
    if all(not isinstance(u, Tensor) for u in updates):
        return cat(updates, weights)  # the same matrix, kept low rank
    return sum(w * dense(u) for u, w in zip(updates, weights))


def relative_error(approx: Update, target: Update) -> float:
    """``||approx - target||_F / ||target||_F`` (float64; factors are never densified: ``||U V||_F^2 =
    sum((U^T U) * (V V^T))`` over the concatenated factors)."""
    if isinstance(approx, Tensor) or isinstance(target, Tensor):
        diff, norm = dense(approx).double() - dense(target).double(), dense(target).double()
        num, den = float((diff**2).sum()), float((norm**2).sum())
    else:
        num = _squared_norm(torch.cat([approx[0], -target[0]], 1), torch.cat([approx[1], target[1]], 0))
        den = _squared_norm(*target)
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.sqrt(max(num, 0.0))


def _squared_norm(up: Tensor, down: Tensor) -> float:
    up, down = up.double(), down.double()
    return float(((up.t() @ up) * (down @ down.t())).sum())


MERGE_RULES.register("svd", linear)  # the target rank / energy makes it a truncation (model.merge_adapters)


@MERGE_RULES.decorator("lego")
def lego(updates: Sequence[Update], weights: Sequence[float], units: int | None = None, reweight: str = "output",
         seed: int = 0) -> Factors:
    """LoRA-LEGO (:mod:`lorakit.merging.lego`): the weighted rank-wise units clustered into ``units`` (default: the
    largest input rank) merged units."""
    pairs = [factored(u) for u in updates]
    return lego_merge(pairs, weights, units or max(d.shape[0] for _, d in pairs), reweight=reweight, seed=seed)


def keep_largest(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ``density`` fraction of largest-magnitude entries set to zero."""
    k = max(1, math.ceil(density * delta.numel()))
    if k >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (delta.abs() >= threshold)


def drop_and_rescale(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: each entry kept with probability ``density`` and divided by it."""
    keep = torch.rand(delta.shape, generator=generator, device="cpu").to(delta.device) < density
    return delta * keep / density


def ties_combine(deltas: Sequence[Tensor]) -> Tensor:
    """TIES' sign election and disjoint mean over already trimmed, weighted updates."""
    stacked = torch.stack(list(deltas))
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)


@MERGE_RULES.decorator("ties")
def ties(updates: Sequence[Update], weights: Sequence[float], density: float = 0.2) -> Tensor:
    _check_density(density)
    return ties_combine([keep_largest(w * dense(u), density) for u, w in zip(updates, weights)])


@MERGE_RULES.decorator("dare_linear")
def dare_linear(updates: Sequence[Update], weights: Sequence[float], density: float = 0.5, seed: int = 0) -> Tensor:
    _check_density(density)
    g = torch.Generator().manual_seed(seed)
    return sum(w * drop_and_rescale(dense(u), density, g) for u, w in zip(updates, weights))


@MERGE_RULES.decorator("dare_ties")
def dare_ties(updates: Sequence[Update], weights: Sequence[float], density: float = 0.5, seed: int = 0) -> Tensor:
    _check_density(density)
    g = torch.Generator().manual_seed(seed)
    return ties_combine([w * drop_and_rescale(dense(u), density, g) for u, w in zip(updates, weights)])


@MERGE_RULES.decorator("magnitude_prune")
def magnitude_prune(updates: Sequence[Update], weights: Sequence[float], density: float = 0.2) -> Tensor:
    _check_density(density)
    return sum(w * keep_largest(dense(u), density) for u, w in zip(updates, weights))


def _check_density(density: float) -> None:
    require(isinstance(density, (int, float)) and 0 < density <= 1, "density", density, "must be in (0, 1]")


def apply_rule(rule: str, updates: Sequence[Update], weights: Sequence[float], **options: Any) -> Update:
    """``MERGE_RULES[rule](updates, weights, **options)`` after checking the inputs agree."""
    require(len(updates) > 0 and len(updates) == len(weights), "updates", len(updates),
            f"must be one or more, one per weight ({len(weights)} weights)")
    require(all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights), "weights", list(weights),
            "must be finite numbers")
    shapes = {tuple(dense_shape(u)) for u in updates}
    if len(shapes) != 1:
        raise LorakitError(f"updates of one layer must have one shape; got {sorted(shapes)} (different bases?)")
    fn = MERGE_RULES.get(rule)
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("updates", "weights")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise LorakitError(f"merge rule {rule!r} has no option(s) {unknown}; its options: {accepted or 'none'}")
    return fn(updates, weights, **options)


def dense_shape(update: Update) -> tuple[int, int]:
    return tuple(update.shape) if isinstance(update, Tensor) else (update[0].shape[0], update[1].shape[1])
