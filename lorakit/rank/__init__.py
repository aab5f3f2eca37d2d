"""Rank allocation during training: hooks that prune (SoRA, AdaLoRA), grow (IncreLoRA) or select (Flexora, CoLoRA)
ranks and layers, DyLoRA's any-rank tools, plus the regularisers and perturbations of LoRA training rules (PEGO,
LoRA-GGPO), and AirLLM's per-module rank vectors (:mod:`.airllm`: a policy's ranks as a config, and their bytes).
Every hook is a :class:`~lorakit.hooks.TrainingHook`, usable in the lorakit trainer and in any loop.
Importing this package registers the training rules of the gated methods (SoRA, AdaLoRA, IncreLoRA) beside their
hooks; the other methods register theirs in their own files."""
from . import adalora, increlora, sora  # noqa: F401  (training-rule registration)
from .airllm import RankVector, load_ranks, rank_vector, save_ranks
from .ops import gated_layers, ranks_of, total_rank

__all__ = ["RankVector", "gated_layers", "load_ranks", "rank_vector", "ranks_of", "save_ranks", "total_rank"]
