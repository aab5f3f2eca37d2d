"""GS-LoRA / GS-LoRA++: continual forgetting with group-sparse LoRA (Zhao et al., 2024; METHODS.md entry 80).

A LoRA on the FFN layers of every block (``gate_proj``, ``up_proj``, ``down_proj`` by default) per forgetting
request; the adapter tensors of one block form a group ``θ_g``. The loss over a forget batch ``D_f`` and a batch of
retained data ``D_r`` (round-robin over the retained tasks) is

    L = CE(D_r) + max(0, BND - CE(D_f))                       retain, and bounded ascent on the forget data
      + β ( mean_{D_r} [1 - cos(h, p_y)] + mean_{D_f} max(0, cos(h, p_y) - margin) )   GS-LoRA++ prototypes

with ``h`` the last hidden state at the prediction position and ``p_y`` the original model's mean of it per class
(computed before forgetting); ``BND`` defaults to ``log(labels)``, the cross-entropy of chance. After each optimizer
step the group-lasso proximal step ``θ_g ← θ_g · max(0, 1 - η λ / ||θ_g||_2)`` sets whole groups exactly to zero,
so only the blocks that must change do.
"""
from __future__ import annotations

import math
import re
from itertools import cycle
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hooks import TrainingHook
from ..hosts.host import hosts
from ..inject import disable
from ..train.tasks import ClassificationTask, Example
from .learners import AdapterSettings, fresh_adapter
from .loop import DEFAULT_FIT, Batch, FitSettings, fit
from .unlearn import UNLEARNERS, Retained, Unlearner, last_position

FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
FFN_ADAPTER = AdapterSettings(targets=FFN_TARGETS)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def block_groups(model: nn.Module, name: str) -> dict[int, list[nn.Parameter]]:
    """Adapter ``name``'s trainable tensors grouped by transformer block (index read from the layer's path)."""
    groups: dict[int, list[nn.Parameter]] = {}
    for host in hosts(model):
        if name in host.adapters:
            found = _BLOCK.search(host.path)
            if found is None:
                raise LorakitError(f"layer {host.path} has no block index (layers.N / h.N / blocks.N) to group by")
            groups.setdefault(int(found.group(1)), []).extend(host.adapters[name].trainable().values())
    return groups


@torch.no_grad()
def group_prox(groups: dict[int, list[Tensor]], threshold: float) -> None:
    """The proximal operator of ``threshold · Σ_g ||θ_g||_2``: each group shrinks by ``threshold`` in norm, and
    becomes exactly zero when its norm is below it."""
    for tensors in groups.values():
        norm = torch.sqrt(sum(t.square().sum() for t in tensors))
        factor = torch.clamp(1 - threshold / norm, min=0.0) if norm > 0 else torch.zeros(())
        for t in tensors:
            t.mul_(factor)


def nonzero_groups(groups: dict[int, list[Tensor]]) -> list[int]:
    return [g for g, tensors in groups.items() if any(bool(t.abs().sum() > 0) for t in tensors)]


class GroupLasso(TrainingHook):
    """After every step: :func:`group_prox` with threshold ``η λ`` (``η`` the step's learning rate)."""

    def __init__(self, groups: dict[int, list[nn.Parameter]], lam: float) -> None:
        self.groups, self.lam, self._eta = groups, lam, 0.0

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._eta = float(optimizer.param_groups[0]["lr"])

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        group_prox(self.groups, self._eta * self.lam)

    def metrics(self) -> dict[str, float]:
        return {"gs_lora_groups": float(len(nonzero_groups(self.groups)))}


@torch.no_grad()
def prototypes(model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example]) -> Tensor:
    """``(labels, H)``: the base model's mean last hidden state at the prediction position, per class."""
    sums, counts = None, torch.zeros(len(scorer.labels))
    with disable(model):
        for first in range(0, len(examples), 32):
            batch = scorer.collate(examples[first:first + 32])
            _, (h,) = last_position(model, scorer, batch)
            sums = torch.zeros(len(scorer.labels), h.shape[-1]) if sums is None else sums
            sums.index_add_(0, batch["label"], h)
            counts += torch.bincount(batch["label"], minlength=len(scorer.labels))
    return sums / counts.clamp_min(1).unsqueeze(1)


class GsLora(Unlearner):
    """GS-LoRA (``prototype_weight=0``) or GS-LoRA++ (module docstring)."""

    name = "gs-lora"

    def __init__(self, adapter: AdapterSettings = FFN_ADAPTER,
                 settings: FitSettings = DEFAULT_FIT, group_lambda: float = 0.05, bound: float | None = None,
                 prototype_weight: float = 0.1, margin: float = 0.5) -> None:
        super().__init__(adapter, settings)
        require(group_lambda >= 0, "group_lambda", group_lambda, "must be >= 0")
        require(prototype_weight >= 0, "prototype_weight", prototype_weight, "must be >= 0")
        self.group_lambda, self.bound = group_lambda, bound
        self.prototype_weight, self.margin = prototype_weight, margin
        self.groups: dict[int, list[nn.Parameter]] = {}

    def forget(self, model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example],
               retained: Retained) -> list[float]:
        if not retained:
            raise LorakitError("GS-LoRA needs retained data (the other tasks); O3 unlearns without it")
        name = f"forget{self.requests}"
        self.requests += 1
        protos = {id(s): prototypes(model, s, ex) for s, ex in [(scorer, examples), *retained]}
        streams = cycle([(s, ex, i) for s, ex in retained for i in range(0, len(ex), self.settings.batch_size)])
        bound = math.log(len(scorer.labels)) if self.bound is None else self.bound
        params = fresh_adapter(model, self.adapter.lora(), name)
        self.groups = block_groups(model, name)

        def proto_term(s: ClassificationTask, h: Tensor, labels: Tensor, forgotten: bool) -> Tensor:
            cos = F.cosine_similarity(h, protos[id(s)][labels], dim=-1)
            return (cos - self.margin).clamp_min(0).mean() if forgotten else (1 - cos).mean()

        def loss(model: nn.Module, batch: Batch) -> Tensor:
            s, ex, first = next(streams)
            kept = s.collate(ex[first:first + self.settings.batch_size])
            logits_f, (h_f,) = last_position(model, scorer, batch)
            logits_r, (h_r,) = last_position(model, s, kept)
            total = F.cross_entropy(logits_r, kept["label"]) + \
                (bound - F.cross_entropy(logits_f, batch["label"])).clamp_min(0)
            if self.prototype_weight:
                total = total + self.prototype_weight * (proto_term(s, h_r, kept["label"], False) +
                                                         proto_term(scorer, h_f, batch["label"], True))
            return total

        return fit(model, scorer, examples, params, self.settings, [GroupLasso(self.groups, self.group_lambda)],
                   loss)


UNLEARNERS.register("gs-lora", GsLora)
