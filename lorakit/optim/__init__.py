"""Update rules: the optimizer registry (AdamW, and memory-efficient / adapter-aware rules registered beside it)."""
from .allora import ALLoRA  # registers "allora"
from .fira import Fira  # registers "fira"
from .galore import ProjectedAdamW  # registers "galore"
from .loraplus import loraplus  # registers "loraplus"
from .natural_galore import NaturalGaLore  # registers "natural-galore"
from .per_layer import per_layer_updates
from .registry import OPTIMIZERS, OptimizerFactory, build_optimizer

__all__ = ["OPTIMIZERS", "OptimizerFactory", "build_optimizer", "ProjectedAdamW", "Fira", "NaturalGaLore",
           "per_layer_updates", "loraplus", "ALLoRA"]
