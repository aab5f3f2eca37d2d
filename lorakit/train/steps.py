"""One adapter's optimisation state: optimizer, schedule, training hooks and step count.

Shared by the single-adapter :class:`~lorakit.train.loop.Trainer` and multi-job training
(:mod:`lorakit.train.multijob`), so both apply a step the same way: regulariser once per step, gradient clipping
with a stop *before* any update on a non-finite loss or norm, the hooks around ``optimizer.step()``, the schedule.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..hooks import HookList, TrainingHook, optimized_parameters
from ..inject import parameter_roles
from ..optim import build_optimizer
from .errors import TrainingError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``batch_size`` is the global micro-batch (split over processes)."""

    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # 0: only the final adapter (and a checkpoint on Ctrl-C)
    optimizer: str = "adamw"  # a name in lorakit.optim.OPTIMIZERS
    optimizer_options: dict[str, Any] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


def _linear_warmup_decay(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def linear_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """The learning rate rises linearly from 0 over ``warmup`` steps, then falls linearly to 0 at step ``total``.

    The same factors as transformers' ``get_linear_schedule_with_warmup``, defined here because importing
    ``transformers.optimization`` imports ``transformers.trainer_utils`` and with it peft, bitsandbytes and torchao
    when they are installed (seconds of start-up, and their warnings on every ``lorakit`` command).
    """
    return LambdaLR(optimizer, functools.partial(_linear_warmup_decay, warmup=warmup, total=total))


class AdapterSteps:
    """Optimizes ``named_params`` of ``model`` (an adapter's tensors, or every weight) with ``config``'s optimizer
    and linear warmup/decay schedule."""

    def __init__(self, model: nn.Module, named_params: Mapping[str, nn.Parameter], config: TrainConfig,
                 hooks: Sequence[TrainingHook] = ()) -> None:
        self.model, self.config = model, config
        self.hooks = HookList(hooks)
        self.optimizer = build_optimizer(config.optimizer, named_params, lr=config.lr,
                                         weight_decay=config.weight_decay, roles=parameter_roles(model),
                                         **config.optimizer_options)
        self.scheduler = linear_schedule_with_warmup(self.optimizer, math.ceil(config.warmup * config.steps),
                                                     config.steps)
        self.step = 0

    @property
    def params(self) -> list[nn.Parameter]:
        """The tensors trained now (hooks may prune, grow or freeze them between steps)."""
        return optimized_parameters(self.optimizer)

    def regularise(self, share: float = 1.0) -> None:
        """Backward the hooks' regulariser once for this step (``share``: this process's part of it)."""
        extra = self.hooks.regulariser(self.model)
        if extra is not None:
            (extra * share).backward()

    def clip(self, loss: float, label: str, advice: str) -> float:
        """Clip the gradients and return their norm; on a non-finite loss or norm drop them and raise, naming
        ``label`` (who failed) and ``advice`` (what to do)."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"{label}loss is {loss} (gradient norm {norm}) at step {self.step + 1}; stopped "
                                f"before applying it: {advice}")
        return norm

    def apply(self) -> float:
        """One optimizer step with the hooks around it; returns the learning rate it used."""
        lr = self.scheduler.get_last_lr()[0]
        self.hooks.before_step(self.model, self.optimizer, self.step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.hooks.after_step(self.model, self.optimizer, self.step)
        return lr
