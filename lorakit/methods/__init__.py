"""Adapter methods. Importing this package registers every built-in method."""
from . import bone, dora, kron, loldu, lora, lora_xs, randlora, svfit  # noqa: F401  (registration side effects)
from .base import METHODS, Adapter, Capabilities, build_config, register_method

__all__ = ["METHODS", "Adapter", "Capabilities", "build_config", "register_method"]
