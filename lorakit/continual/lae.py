"""LAE: Learning-Accumulation-Ensemble (Gao et al., ICCV 2023; METHODS.md entry 77) with LoRA as the PET module.

1. **Learning**: an online adapter ``online`` trains on each new task. Adaptation-speed calibration: the paper
   scales each PET kind's output so that kinds adapt equally fast; here that factor is ``speed``, multiplying
   LoRA's own scale ``alpha / r`` (1 = plain LoRA).
2. **Accumulation**: from the second task on, an offline adapter ``offline`` (a copy of the online one when the
   second task starts, as the authors' code creates its EMA) follows it by momentum after every optimizer step,

       theta_off <- m * theta_off + (1 - m) * theta_on          (every adapter tensor, exactly)

3. **Ensemble**: a prediction takes, per label, the larger of the two experts' probabilities,
   ``max(softmax(f_on(x)), softmax(f_off(x)))`` -- both experts in *one* model call, the batch's rows routed to
   ``online`` and to ``offline`` (:func:`lorakit.route`).

The paper's EMA momentum is 0.9999 over tens of epochs; short runs need a smaller ``m`` to accumulate anything.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hooks import TrainingHook
from ..hosts.host import hosts
from ..inject import adapt, configs, route, set_active, trainable_parameters
from ..train.tasks import ClassificationTask, Example
from .learners import DEFAULT_ADAPTER, LEARNERS, AdapterSettings, Learner
from .loop import DEFAULT_FIT, Batch, FitSettings, fit


@torch.no_grad()
def ema_update(model: nn.Module, target: str, source: str, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for every tensor of adapter ``target`` on every
    layer (``momentum = 0`` copies). Both adapters must have the same method and shapes."""
    for host in hosts(model):
        if (target in host.adapters) != (source in host.adapters):
            raise LorakitError(f"layer {host.path} holds only one of adapters {target!r} and {source!r}")
        if target not in host.adapters:
            continue
        mine, theirs = host.adapters[target].state_dict(), host.adapters[source].state_dict()
        for key, value in mine.items():
            if value.shape != theirs[key].shape:
                raise LorakitError(f"{host.path}: {target}.{key} is {tuple(value.shape)} but {source}.{key} is "
                                   f"{tuple(theirs[key].shape)}")
            if value.is_floating_point():
                value.mul_(momentum).add_(theirs[key], alpha=1.0 - momentum)


class AdapterEma(TrainingHook):
    """After every optimizer step: :func:`ema_update` of ``target`` towards ``source``."""

    def __init__(self, target: str, source: str, momentum: float) -> None:
        require(0.0 <= momentum < 1.0, "momentum", momentum, "must be in [0, 1)")
        self.target, self.source, self.momentum = target, source, momentum

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        ema_update(model, self.target, self.source, self.momentum)


def ensemble_logits(model: nn.Module, scorer: ClassificationTask, batch: Batch,
                    experts: Sequence[str]) -> Tensor:
    """``log max_e softmax(f_e(x))`` over label words, all experts in one call (rows repeated per expert)."""
    rows = batch["input_ids"].shape[0]
    stacked = {k: v.repeat(len(experts), *([1] * (v.dim() - 1))) for k, v in batch.items()}
    with route(model, [e for e in experts for _ in range(rows)]):
        logits = scorer.label_logits(model, stacked)
    probs = logits.softmax(-1).reshape(len(experts), rows, -1)
    return probs.max(0).values.log()


class Lae(Learner):
    """LAE over LoRA (module docstring). ``momentum``: the offline adapter's EMA ``m``; ``speed``: the calibration
    factor of the online adapter's scale."""

    name = "lae"

    def __init__(self, adapter: AdapterSettings = DEFAULT_ADAPTER, settings: FitSettings = DEFAULT_FIT,
                 momentum: float = 0.98, speed: float = 1.0) -> None:
        super().__init__(adapter, settings)
        require(0.0 <= momentum < 1.0, "momentum", momentum, "must be in [0, 1)")
        require(speed > 0, "speed", speed, "must be > 0")
        self.momentum, self.speed = momentum, speed

    def learn(self, model: nn.Module, index: int, scorer: ClassificationTask,
              examples: Sequence[Example]) -> list[float]:
        if "online" not in configs(model):
            adapt(model, self.adapter.lora(alpha=self.adapter.alpha * self.speed), "online")
        if index >= 1 and "offline" not in configs(model):
            adapt(model, configs(model)["online"], "offline", activate=False)
            ema_update(model, "offline", "online", 0.0)
            for host in hosts(model):
                host.adapters["offline"].frozen = True
                host.adapters["offline"].requires_grad_(False)
        set_active(model, "online")
        hooks = [AdapterEma("offline", "online", self.momentum)] if "offline" in configs(model) else []
        return fit(model, scorer, examples, trainable_parameters(model, "online"), self.settings, hooks)

    def predict(self, model: nn.Module, scorer: ClassificationTask, batch: Batch) -> Tensor:
        experts = ["online", "offline"] if "offline" in configs(model) else ["online"]
        return ensemble_logits(model, scorer, batch, experts)

    def finish(self, model: nn.Module) -> nn.Module:
        raise LorakitError("LAE predicts with an ensemble of two adapters, which no single merged model equals; "
                           "unlearning needs a learner that merges (sequential, codyra, alignguard)")


LEARNERS.register("lae", Lae)
