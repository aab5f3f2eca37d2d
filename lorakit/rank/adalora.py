"""AdaLoRA (Zhang et al., 2023): the budget schedule, importance-based masking of singular values, and the
orthogonality regulariser, on the gated ``P Λ Q`` adapter (:mod:`lorakit.methods.gated`).

The total budget (number of non-zero ``λ`` over all layers) follows the paper's cubic schedule (eq. 13)::

    b(t) = b0                                             t <= t_init
         = b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3
         = b_T                                            t > T - t_final

Every ``delta_t`` steps in the middle phase (and at its end, and whenever ``b(t)`` falls below the ranks the
current mask leaves) the ``b(t)`` triplets with the highest importance score (:mod:`lorakit.rank.importance`) stay
and the rest are masked; the mask is applied after *every* step, so the budget holds at every step (PEFT re-masks
only every ``delta_t`` steps, letting masked ``λ`` drift and the budget lag in between). At
step ``T`` the masked ranks are pruned (tensors and optimizer state), leaving a compact adapter whose
``rank_pattern`` records each layer's rank.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..methods.adalora import AdaLoraConfig
from .importance import ImportanceHook
from .ops import gated_layers, resize_ranks, total_rank


class AdaLoraHook(ImportanceHook):
    """Budget schedule + masking + orthogonality regulariser; prunes the masked ranks at ``total_steps``.

    ``target_rank`` is the final total rank over all layers (``per_layer``: per layer on average).
    """

    def __init__(self, name: str = "default", *, total_steps: int, target_rank: int, per_layer: bool = False,
                 t_init: int = 0,
                 t_final: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg: float = 0.5) -> None:
        require(total_steps >= 1, "total_steps", total_steps, "must be >= 1")
        require(target_rank >= 0, "target_rank", target_rank, "must be >= 0 (total rank over all layers)")
        require(t_init >= 0 and t_final >= 0 and t_init + t_final < total_steps, "t_init/t_final",
                (t_init, t_final), f"must be >= 0 and leave a pruning phase within {total_steps} steps")
        require(delta_t >= 1, "delta_t", delta_t, "must be >= 1")
        require(orth_reg >= 0, "orth_reg", orth_reg, "must be >= 0")
        super().__init__(name, beta1, beta2, orth_reg)
        self.total_steps, self.t_init, self.t_final = total_steps, t_init, t_final
        self.target_rank, self.per_layer, self.target = target_rank, per_layer, target_rank
        self.delta_t = delta_t
        self.initial: int | None = None
        self.masks: dict[str, Tensor] = {}  # path -> bool (r,), True = masked

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().on_train_begin(model, optimizer)
        if self.initial is None:
            self.initial = total_rank(model, self.name)
        layers = len(list(gated_layers(model, self.name)))
        self.target = self.target_rank * layers if self.per_layer else self.target_rank
        require(self.target <= self.initial, "target_rank", self.target,
                f"must not exceed the starting total rank {self.initial}")

    def budget(self, step: int) -> int:
        """``b(t)``: the number of unmasked ranks allowed after step ``step``."""
        assert self.initial is not None
        if step <= self.t_init:
            return self.initial
        span = self.total_steps - self.t_init - self.t_final
        if step > self.total_steps - self.t_final:
            return self.target
        frac = 1.0 - (step - self.t_init) / span
        return int(self.target + (self.initial - self.target) * frac ** 3)

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        in_schedule = self.t_init < step <= self.total_steps - self.t_final
        budget = self.budget(step)
        due = step % self.delta_t == 0 or step == self.total_steps - self.t_final or self._kept(model) > budget
        if in_schedule and due:
            self._mask_to(model, budget)
        for host, adapter in gated_layers(model, self.name):
            if host.path in self.masks:
                adapter.lora_E.masked_fill_(self.masks[host.path], 0.0)
        if step == self.total_steps:
            self.prune(model, optimizer)

    def _kept(self, model: nn.Module) -> int:
        """Ranks the current mask leaves."""
        return sum(a.r - int(self.masks[h.path].sum()) if h.path in self.masks else a.r
                   for h, a in gated_layers(model, self.name))

    def _mask_to(self, model: nn.Module, budget: int) -> None:
        layers = list(gated_layers(model, self.name))
        scores = [self.importance.scores(h.path, a) for h, a in layers]
        flat = torch.cat(scores)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if budget > 0:
            keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        for (host, _), part in zip(layers, keep.split([s.numel() for s in scores])):
            self.masks[host.path] = ~part

    @torch.no_grad()
    def prune(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the masked ranks from the tensors and the optimizer's state."""
        for host, _ in list(gated_layers(model, self.name)):
            mask = self.masks.pop(host.path, None)
            if mask is not None and bool(mask.any()):
                keep = torch.nonzero(~mask).flatten()
                resize_ranks(model, self.name, host, keep, optimizer=optimizer)
                self.importance.resize(host.path, keep, 0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": self.initial, "masks": dict(self.masks),
                "importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        self.initial, self.masks = state["initial"], dict(state["masks"])
        self.importance.load_state_dict(state["importance"])


@training_rule("adalora")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, AdaLoraConfig)
    return [AdaLoraHook(name, total_steps=steps, target_rank=config.target_r, per_layer=True,
                        t_init=int(config.t_init * steps), t_final=int(config.t_final * steps),
                        delta_t=config.delta_t, beta1=config.beta1, beta2=config.beta2, orth_reg=config.orth_reg)]
