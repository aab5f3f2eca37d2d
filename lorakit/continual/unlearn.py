"""Unlearning methods: remove a task (an unlearning request) from a model that learned it.

Each is an :class:`Unlearner` registered in :data:`UNLEARNERS` (``lorakit continual --unlearn NAME --forget
TASK``): ``o3`` (:mod:`lorakit.continual.o3`: an orthogonal LoRA per request, gated per input by an OOD detector,
no retained data) and ``gs-lora`` (:mod:`lorakit.continual.gs_lora`: group-sparse LoRA on the FFNs with retained
data and prototypes). They act on the plain model a :class:`~lorakit.continual.learners.Learner` leaves.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

from torch import Tensor, nn

from ..registry import Registry
from ..train.tasks import ClassificationTask, Example
from .learners import DEFAULT_ADAPTER, AdapterSettings
from .loop import DEFAULT_FIT, Batch, FitSettings, label_logits

Retained = Sequence[tuple[ClassificationTask, Sequence[Example]]]


class Unlearner:
    """An unlearning method: :meth:`forget` handles one request; :meth:`predict` scores afterwards."""

    name: ClassVar[str]

    def __init__(self, adapter: AdapterSettings = DEFAULT_ADAPTER, settings: FitSettings = DEFAULT_FIT) -> None:
        self.adapter, self.settings = adapter, settings
        self.requests = 0

    def forget(self, model: nn.Module, scorer: ClassificationTask, examples: Sequence[Example],
               retained: Retained) -> list[float]:
        """Unlearn ``examples`` of ``scorer``'s task; ``retained`` holds the other tasks' training data (methods
        that need no retained data ignore it). Returns the loss of each step."""
        raise NotImplementedError

    def predict(self, model: nn.Module, scorer: ClassificationTask, batch: Batch) -> Tensor:
        return label_logits(model, scorer, batch)


UNLEARNERS: Registry[type[Unlearner]] = Registry("unlearning method")


def last_position(model: nn.Module, scorer: ClassificationTask, batch: Batch,
                  hidden_layers: Sequence[int] = (-1,)) -> tuple[Tensor, list[Tensor]]:
    """``(label logits (B, labels), [hidden state at the last position (B, H) for each of hidden_layers])``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], output_hidden_states=True)
    logits = out.logits[:, -1][:, scorer.label_ids.to(out.logits.device)].float()
    return logits, [out.hidden_states[i][:, -1].float() for i in hidden_layers]
