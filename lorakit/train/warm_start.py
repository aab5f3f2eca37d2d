"""Data-driven initialisation inside a fine-tuning run (``lorakit finetune --init lora-ga|eva|lora-sb``).

The initialiser (:func:`lorakit.initialize`) sees the task's own loss on the first training batches, in the
order the run would train on them. It is deterministic for a given model, data and seed, so a resumed run
re-initialises the same way (rewriting the same base weights) before the checkpoint's adapter tensors are loaded.
Adapters whose base was rewritten from data cannot be saved as a plain file of their own tensors; they are
exported as a LoRA relative to the unmodified base (:func:`lorakit.export_lora`), which any PEFT user can load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import Tensor, nn

from ..data_init import initialize
from ..init.registry import INITS
from ..inject import configs
from ..io.adapter_files import reproducible_from_file, save_adapter
from ..io.export import export_lora
from .data import BatchOrder
from .tasks import Example, Task


def needs_data(model: nn.Module, adapter: str = "default") -> bool:
    """Whether ``adapter``'s initialiser runs on data."""
    init = getattr(configs(model)[adapter], "init", None)
    return init in INITS and INITS.get(init).needs_data


def initialize_from_task(model: nn.Module, task: Task, train: Sequence[Example], batch_size: int, batches: int,
                         seed: int, adapter: str = "default") -> None:
    """Run ``adapter``'s data-driven initialiser on the first ``batches`` training batches, with ``task``'s loss."""
    order = BatchOrder(len(train), batch_size, seed)
    data = [task.collate([train[i] for i in order.indices(step)]) for step in range(batches)]

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        sums = task.loss_sums(m, batch)
        return sums.loss / max(sums.count, 1)

    initialize(model, data, adapter, batches=batches, model_loss=loss)


def save_trained(model: nn.Module, output: Path, adapter: str = "default") -> str:
    """Save the trained adapter to ``output`` in PEFT's format; returns how (a note for the report)."""
    if reproducible_from_file(model, adapter):
        save_adapter(model, output, adapter)
        return "adapter"
    export_lora(model, output, adapter)
    return "adapter (exported as a rank-2r LoRA on the unmodified base: its initialiser rewrote the base from data)"


