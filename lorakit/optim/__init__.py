"""Update rules: the optimizer registry (AdamW, and memory-efficient / adapter-aware rules registered beside it)."""
from .registry import OPTIMIZERS, OptimizerFactory, build_optimizer

__all__ = ["OPTIMIZERS", "OptimizerFactory", "build_optimizer"]
