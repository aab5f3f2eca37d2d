"""Low-rank compression of a model's linear layers (LORD, METHODS.md entry 67; Greenformers, entry 68).

``decompose(layer, rank=..., method="svd" | "activation" | "fisher")`` turns one ``nn.Linear`` into a trainable
:class:`FactoredLinear` (``up(down(x))``); ``compress_model`` does it for every target layer where it saves
parameters; ``save_compressed`` / ``load_compressed`` write and rebuild the model as a transformers folder
(``lorakit compress``; ``load_model`` reads it, so ``finetune``, ``eval`` and ``serve`` accept it).

The other compression papers are modules of their own: ``maestro`` (trainable decomposition, ordered dropout),
``loraprune`` (structured pruning from LoRA gradients), ``lr2vq`` (low-rank + subvector quantisation),
``scatterbrain`` (sparse + low-rank attention), ``ctr`` (factorised CTR models, output PCA), ``lowrank_mhsa``
(low-rank multi-head self-attention on a GRU classifier) and ``linformer`` (Greenformers' comparison: sequence
projection vs factorised weights, with the crossover length).
"""
from __future__ import annotations

from .decompose import DECOMPOSITIONS, calibration_stats, choose_rank, decompose, low_rank
from .factored import FactoredLinear, break_even
from .model import (
    COMPRESSION_FILE,
    CompressionFileError,
    CompressionReport,
    LayerReport,
    compress_model,
    factored_layers,
    load_compressed,
    save_compressed,
)

__all__ = ["COMPRESSION_FILE", "DECOMPOSITIONS", "CompressionFileError", "CompressionReport", "FactoredLinear",
           "LayerReport", "break_even", "calibration_stats", "choose_rank", "compress_model", "decompose",
           "factored_layers", "load_compressed", "low_rank", "save_compressed"]
