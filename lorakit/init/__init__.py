"""Initialisers of low-rank factors (``init="pissa"`` etc. in a method's config), registered by name.

Weight-based initialisers (PiSSA, OLoRA, NLoRA, LoftQ) run when the adapter is built; data-driven ones (LoRA-GA,
EVA, LoRA-SB) run on a model-level call, :func:`lorakit.initialize`. Importing this package registers them all;
it imports no method, so method files can validate their ``init`` against :data:`INITS`.
"""
from . import eva, loftq, lora_ga, lora_sb, nlora, olora, pissa  # noqa: F401  (registration side effects)
from .registry import INITS, Factors, Initialiser, LayerInfo, check_init, register_init

__all__ = ["INITS", "Factors", "Initialiser", "LayerInfo", "check_init", "register_init"]
