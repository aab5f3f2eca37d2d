"""CoLoRA (METHODS.md entry 31): each layer's rank from its contribution, within a total rank budget.

The paper's contribution measure is not in its abstract; assumed here (as METHODS.md recalls it): after a short
probe training of any adapter, a layer's contribution is its relative weight change ``||ΔW_l||_F / ||W0_l||_F``
(:func:`contributions`). Ranks are then proportional to contribution (:func:`allocate_ranks`: largest-remainder
rounding so they sum exactly to the budget, capped at ``r_max``); a layer with zero contribution gets rank 0 and
no adapter (:func:`allocated_config` leaves it out of the targets). Retraining with the allocated ranks is an
ordinary LoRA run with PEFT's ``rank_pattern``.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import nn

from ..errors import LorakitError, require
from ..hosts.host import adapters_named
from ..methods.lora import LoraConfig


@torch.no_grad()
def contributions(model: nn.Module, name: str = "default") -> dict[str, float]:
    """Layer path -> ``||ΔW||_F / ||W0||_F`` of adapter ``name`` (any method; the update from ``delta_weight``)."""
    out = {}
    for host, adapter in adapters_named(model, name):
        w0 = host.backend.weight().float()
        out[host.path] = float(adapter.delta_weight(host.backend).norm() / w0.norm().clamp_min(1e-12))
    if not out:
        raise LorakitError(f"CoLoRA: the model has no adapter named {name!r}")
    return out


def allocate_ranks(scores: Mapping[str, float], budget: int, r_max: int | None = None) -> dict[str, int]:
    """Integer ranks proportional to ``scores`` summing to ``budget`` (fewer only when every layer is at
    ``r_max``); layers with score 0 get 0."""
    require(budget >= 0, "budget", budget, "must be >= 0")
    require(all(s >= 0 and math.isfinite(s) for s in scores.values()), "scores", dict(scores),
            "must be finite and >= 0")
    cap = budget if r_max is None else r_max
    ranks = {k: 0 for k in scores}
    remaining = budget
    while remaining > 0:
        open_ = {k: s for k, s in scores.items() if s > 0 and ranks[k] < cap}
        total = sum(open_.values())
        if not open_ or total == 0:
            break
        share = {k: remaining * s / total for k, s in open_.items()}
        whole = {k: min(int(share[k]), cap - ranks[k]) for k in open_}
        given = sum(whole.values())
        order = sorted(open_, key=lambda k: share[k] - int(share[k]), reverse=True)
        for k in order[:remaining - given] if given < remaining else []:
            if ranks[k] + whole[k] < cap:
                whole[k] += 1
        for k, r in whole.items():
            ranks[k] += r
        spent = sum(whole.values())
        if spent == 0:
            break
        remaining -= spent
    return ranks


def allocated_config(config: LoraConfig, ranks: Mapping[str, int]) -> LoraConfig:
    """``config`` targeting exactly the layers with a positive rank, each at its rank (PEFT's ``rank_pattern``)."""
    chosen = {path: r for path, r in ranks.items() if r > 0}
    if not chosen:
        raise LorakitError("CoLoRA: every layer got rank 0; raise the budget")
    ordered = sorted(chosen, key=len, reverse=True)  # a pattern matches names ending with it; the first match wins
    return config.replace(
        targets=tuple(ordered), exclude=(),  # whole paths (one regex of them all outgrows the pattern length limit)
        rank_pattern={re.escape(p): chosen[p] for p in ordered},
    )
