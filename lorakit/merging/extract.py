"""A LoRA extracted from a fully fine-tuned model: the truncated SVD of ``W_ft - W_base`` on every targeted layer.

    report = lorakit.merging.extract_lora(finetuned, base, rank=16)     # adds adapter "default" to ``base``
    lorakit.save_adapter(base, "out/extracted")                        # PEFT LoRA of the stock base

For each layer the targets select (default every linear layer but the output head), ``delta = W_ft - W_base`` in the
layer's canonical ``(d_out, d_in)`` layout is factored as ``U_k S_k V_k^T`` with ``k`` the rank (``rank_pattern``:
per-module ranks by regular expression, PEFT's rule) and/or the fewest directions keeping ``energy`` of
``||delta||_F^2`` (mergekit's extract-lora does the same): the best rank-``k`` approximation (Eckart-Young), exact
when ``delta``'s rank is at most ``k``. Layers whose weights are equal are left out; the report lists each layer's
rank and relative error, and the other tensors that differ (norms, embeddings, biases), which a LoRA cannot hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from ..config import pattern_value
from ..errors import LorakitError, require
from ..hosts.geometry import geometry_of
from ..hosts.quantized import backend_for
from ..init.layout import base_matrix
from ..io.export import attach_factors
from ..methods.lora import LoraConfig
from ..targeting import find_targets
from .rules import refactor


@dataclass
class ExtractReport:
    """Per extracted layer its rank and ``||delta - B A||_F / ||delta||_F``; tensors that differ outside them."""

    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    other_differences: list[str] = field(default_factory=list)


def extract_lora(finetuned: nn.Module, base: nn.Module, rank: int | None = 16, energy: float | None = None,
                 targets: str | tuple[str, ...] = "all-linear", rank_pattern: Mapping[str, int] | None = None,
                 into: str = "default") -> ExtractReport:
    """Add to ``base`` a LoRA adapter ``into`` approximating ``finetuned - base`` on the targeted layers."""
    require(rank is not None or energy is not None, "rank / energy", (rank, energy), "give a rank, an energy or both")
    require(rank is None or (isinstance(rank, int) and rank >= 1), "rank", rank, "must be >= 1")
    tuned = dict(finetuned.named_modules())
    report, factors = ExtractReport(), {}
    selected = find_targets(base, LoraConfig(targets=targets))
    for path, module in selected:
        other = tuned.get(path)
        if other is None or type(other) is not type(module) or other.weight.shape != module.weight.shape:
            raise LorakitError(f"layer {path!r} has no counterpart of the same type and shape in the fine-tuned "
                               f"model: are the two models of one architecture?")
        geometry = geometry_of(module)
        delta = base_matrix(geometry, backend_for(other)) - base_matrix(geometry, backend_for(module))
        if not torch.any(delta):
            continue
        k = pattern_value(dict(rank_pattern or {}), path, rank) if rank is not None else None
        up, down = refactor(delta, k, energy)
        factors[path] = (up, down)
        report.ranks[path] = down.shape[0]
        report.errors[path] = _relative_error(delta, up @ down)
    if not factors:
        raise LorakitError("the fine-tuned model's targeted layers equal the base's: there is nothing to extract")
    report.other_differences = _other_differences(finetuned, base, {p for p, _ in selected})
    attach_factors(base, into, factors, activate=True)
    return report


def _relative_error(delta: Tensor, approx: Tensor) -> float:
    return float(torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta))


def _other_differences(finetuned: nn.Module, base: nn.Module, extracted: set[str]) -> list[str]:
    """Names of the tensors outside the extracted layers' weights whose values differ."""
    theirs = dict(finetuned.named_parameters())
    out = []
    for name, p in base.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in extracted and leaf == "weight":
            continue
        q = theirs.get(name)
        if q is None or q.shape != p.shape or not torch.equal(q.detach().to(p.dtype), p.detach()):
            out.append(name)
    return out
