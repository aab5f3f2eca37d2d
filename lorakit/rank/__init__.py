"""Rank allocation during training: hooks that prune (SoRA, AdaLoRA), grow (IncreLoRA), sample (DyLoRA) or
select (Flexora, CoLoRA) ranks and layers, plus the regularisers and perturbations of LoRA training rules
(PEGO, LoRA-GGPO). Every hook is a :class:`~lorakit.train.hooks.TrainingHook`, usable in the lorakit trainer and in
any loop; methods hand theirs to the trainer through ``Adapter.training_hooks``."""
from .ops import gated_layers, ranks_of, total_rank

__all__ = ["gated_layers", "ranks_of", "total_rank"]
