"""Continual-learning methods: how a model learns task ``j`` of a sequence and how it then predicts.

Every method is a :class:`Learner` registered in :data:`LEARNERS` (``lorakit continual --method NAME``):

* ``sequential`` -- one LoRA trained on the tasks one after another (the baseline that forgets);
* ``joint`` -- replay of every task seen so far (the multi-task upper bound, not a continual method);
* ``lae`` -- :mod:`lorakit.continual.lae`; ``codyra`` -- :mod:`lorakit.continual.codyra`;
  ``alignguard`` -- :mod:`lorakit.continual.alignguard`.

:meth:`Learner.finish` leaves a plain model (the adapters merged) for the unlearning methods of
:mod:`lorakit.continual.unlearn`, or refuses when the method's prediction needs its adapters (LAE's ensemble).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..inject import adapt, configs, trainable_parameters, unload
from ..methods.lora import LoraConfig
from ..registry import Registry
from ..train.tasks import ClassificationTask, Example
from .loop import DEFAULT_FIT, Batch, FitSettings, cross_entropy, fit, label_logits


@dataclass(frozen=True)
class AdapterSettings:
    """The adapters a method attaches: rank, scale and target layers (LoRA's meaning)."""

    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] | str = field(default_factory=lambda: ("q_proj", "v_proj"))

    def __post_init__(self) -> None:
        require(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank, "must be an integer >= 1")
        require(self.alpha > 0, "alpha", self.alpha, "must be > 0")

    def lora(self, **overrides: Any) -> LoraConfig:
        return LoraConfig(**{"r": self.rank, "alpha": self.alpha, "targets": self.targets, **overrides})


DEFAULT_ADAPTER = AdapterSettings()


class Learner:
    """A continual-learning method (see the module docstring). Subclasses set ``name`` and override
    :meth:`learn`, and :meth:`predict` / :meth:`finish` where they differ."""

    name: ClassVar[str]

    def __init__(self, adapter: AdapterSettings = DEFAULT_ADAPTER, settings: FitSettings = DEFAULT_FIT) -> None:
        self.adapter, self.settings = adapter, settings

    def learn(self, model: nn.Module, index: int, scorer: ClassificationTask,
              examples: Sequence[Example]) -> list[float]:
        """Train on task ``index`` (0-based); returns the loss of each step."""
        raise NotImplementedError

    def predict(self, model: nn.Module, scorer: ClassificationTask, batch: Batch) -> Tensor:
        """Label scores ``(rows, labels)`` for ``batch`` of ``scorer``'s task."""
        return label_logits(model, scorer, batch)

    def finish(self, model: nn.Module) -> nn.Module:
        """Fold the adapters into the weights: the model that unlearning requests then act on."""
        return unload(model, merge_active=True)


LEARNERS: Registry[type[Learner]] = Registry("continual-learning method")


class Sequential(Learner):
    """Plain sequential fine-tuning: one LoRA (adapter ``default``) keeps training from task to task."""

    name = "sequential"

    def learn(self, model: nn.Module, index: int, scorer: ClassificationTask,
              examples: Sequence[Example]) -> list[float]:
        if "default" not in configs(model):
            adapt(model, self.adapter.lora(), "default")
        return fit(model, scorer, examples, trainable_parameters(model, "default"), self.settings)


class Joint(Learner):
    """Multi-task reference (replay of everything seen): at task ``j`` one LoRA trains on the mean loss of a batch
    of each task ``0..j`` per step. Not a continual method: the upper bound the others are read against."""

    name = "joint"

    def __init__(self, adapter: AdapterSettings = DEFAULT_ADAPTER, settings: FitSettings = DEFAULT_FIT) -> None:
        super().__init__(adapter, settings)
        self.seen: list[tuple[ClassificationTask, Sequence[Example]]] = []

    def learn(self, model: nn.Module, index: int, scorer: ClassificationTask,
              examples: Sequence[Example]) -> list[float]:
        if "default" not in configs(model):
            adapt(model, self.adapter.lora(), "default")
        earlier = [cycle_batches(s, ex, self.settings.batch_size) for s, ex in self.seen]
        self.seen.append((scorer, examples))
        current = cross_entropy(scorer)

        def loss(model: nn.Module, batch: Batch) -> Tensor:
            terms = [current(model, batch)]
            for s, batches in earlier:
                terms.append(cross_entropy(s)(model, next(batches)))
            return sum(terms) / len(terms)

        return fit(model, scorer, examples, trainable_parameters(model, "default"), self.settings, loss_fn=loss)


def cycle_batches(scorer: ClassificationTask, examples: Sequence[Example],
                  batch_size: int) -> tuple[ClassificationTask, Iterator[Batch]]:
    """``(scorer, endless iterator over collated consecutive batches of examples)``."""
    starts = itertools.cycle(range(0, len(examples), batch_size))
    return scorer, (scorer.collate(examples[i:i + batch_size]) for i in starts)


def fresh_adapter(model: nn.Module, config: AdapterConfig, name: str) -> dict[str, nn.Parameter]:
    """Attach adapter ``name`` (the only active one) and return its trainable tensors."""
    adapt(model, config, name)
    return trainable_parameters(model, name)


LEARNERS.register("sequential", Sequential)
LEARNERS.register("joint", Joint)
