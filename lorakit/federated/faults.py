"""Screening client uploads before aggregation: an upload that is malformed, non-finite or far larger than the
round's others is excluded with a reason, and the round goes on with the rest.

The size rule compares each client's update norm (``||upload - global||``, or ``||upload||`` for adapters that start
fresh each round) with the *lower median* of the round's norms: a client ``ratio`` times above it (default 100) is
excluded. The lower median keeps the rule meaningful with two clients (one honest, one 1000x too large).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

Layers = Mapping[str, Mapping[str, Tensor]]


@dataclass(frozen=True)
class Excluded:
    """A client left out of a round, and why."""

    client: int
    reason: str


def shape_problem(upload: Layers, expected: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str | None:
    """Why ``upload`` does not have exactly the ``expected`` layers, roles and shapes (None when it does)."""
    missing = sorted(set(expected) - set(upload))
    extra = sorted(set(upload) - set(expected))
    if missing or extra:
        return f"layers missing {missing[:3]} / unexpected {extra[:3]}"
    for path, roles in expected.items():
        if set(upload[path]) != set(roles):
            return f"layer {path!r} sent roles {sorted(upload[path])}, expected {sorted(roles)}"
        for role, shape in roles.items():
            got = tuple(upload[path][role].shape)
            if got != tuple(shape):
                return f"layer {path!r} role {role!r} has shape {got}, expected {tuple(shape)}"
    return None


def _norm(upload: Layers, reference: Layers | None) -> float:
    total = 0.0
    for path, roles in upload.items():
        for role, t in roles.items():
            diff = t.float() if reference is None else t.float() - reference[path][role].float()
            total += float((diff**2).sum())
    return math.sqrt(total)


def screen(uploads: Sequence[Layers], expected: Sequence[Mapping[str, Mapping[str, tuple[int, ...]]]],
           reference: Layers | None, ratio: float = 100.0) -> tuple[list[int], list[Excluded]]:
    """Indices of the uploads to aggregate and the excluded ones with their reasons.

    ``expected[k]``: the shapes client ``k`` must send; ``reference``: the global tensors the updates are measured
    from (None: the uploads are the updates).
    """
    kept: list[int] = []
    excluded: list[Excluded] = []
    for k, upload in enumerate(uploads):
        problem = shape_problem(upload, expected[k])
        if problem is None and not all(bool(torch.isfinite(t).all()) for roles in upload.values()
                                       for t in roles.values()):
            problem = "non-finite values (NaN or inf) in its update"
        if problem is None:
            kept.append(k)
        else:
            excluded.append(Excluded(k, problem))
    norms = {k: _norm(uploads[k], reference) for k in kept}
    if len(norms) >= 2:
        ordered = sorted(norms.values())
        typical = ordered[(len(ordered) - 1) // 2]
        for k in list(kept):
            if typical > 0 and norms[k] > ratio * typical:
                kept.remove(k)
                excluded.append(Excluded(k, f"update norm {norms[k]:.3g} is {norms[k] / typical:.0f}x the round's "
                                            f"median {typical:.3g} (limit {ratio:g}x)"))
    return kept, sorted(excluded, key=lambda e: e.client)
