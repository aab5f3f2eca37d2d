"""The training and scoring loop shared by the continual-learning and unlearning methods.

:func:`fit` runs ``steps`` optimizer steps of a loss over a task's examples through
:class:`~lorakit.train.steps.AdapterSteps` (so training hooks, clipping and the schedule behave as in
``lorakit finetune``); :func:`accuracy` scores held-out examples with a method's own prediction rule (LAE's
ensemble, O3's gated adapters), by default the task's label logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import TrainingHook
from ..train.data import BatchOrder
from ..train.steps import AdapterSteps, TrainConfig
from ..train.tasks import ClassificationTask, Example

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
Predict = Callable[[nn.Module, ClassificationTask, Batch], Tensor]


@dataclass(frozen=True)
class FitSettings:
    """How long and how fast each task (or unlearning request) trains."""

    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0


DEFAULT_FIT = FitSettings()


def cross_entropy(scorer: ClassificationTask) -> LossFn:
    """The task's mean cross-entropy over its label words."""
    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(scorer.label_logits(model, batch), batch["label"])
    return loss


def fit(model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example],
        params: Mapping[str, nn.Parameter], settings: FitSettings, hooks: Sequence[TrainingHook] = (),
        loss_fn: LossFn | None = None) -> list[float]:
    """Train ``params`` for ``settings.steps`` steps on batches of ``examples``; returns the loss of each step."""
    steps = AdapterSteps(model, params, TrainConfig(steps=settings.steps, batch_size=settings.batch_size,
                                                     lr=settings.lr, seed=settings.seed, warmup=0.1), hooks)
    order = BatchOrder(len(examples), settings.batch_size, settings.seed)
    loss_fn = loss_fn or cross_entropy(scorer)
    steps.hooks.on_train_begin(model, steps.optimizer)
    losses = []
    model.train()
    for _ in range(settings.steps):
        batch = scorer.collate([examples[i] for i in order.indices(steps.step)])
        steps.hooks.before_forward(model, steps.step)
        loss = loss_fn(model, batch)
        extra = steps.hooks.forward_loss(model)
        (loss if extra is None else loss + extra).backward()
        steps.regularise()
        value = float(loss.detach())
        steps.clip(value, "", "lower the learning rate")
        steps.apply()
        losses.append(value)
    model.eval()
    return losses


def label_logits(model: nn.Module, scorer: ClassificationTask, batch: Batch) -> Tensor:
    """The default prediction: the task's label logits under the model as it is."""
    return scorer.label_logits(model, batch)


@torch.no_grad()
def accuracy(model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example],
             predict: Predict = label_logits, batch_size: int = 32) -> float:
    """Share of ``examples`` whose highest-scoring label under ``predict`` is the right one."""
    was_training = model.training
    model.eval()
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    correct = 0
    for first in range(0, len(ordered), batch_size):
        batch = scorer.collate(ordered[first:first + batch_size])
        correct += int((predict(model, scorer, batch).argmax(-1) == batch["label"]).sum())
    model.train(was_training)
    return correct / max(1, len(examples))
