"""Adapter methods. Importing this package registers every built-in method."""
from . import (  # noqa: F401  (registration side effects)
    adalora,
    block_lora,
    bone,
    compacter,
    cp_lora,
    dora,
    dylora,
    flora_n,
    hydra,
    kron,
    lamda,
    loca,
    loldu,
    lora,
    lora_xs,
    mos,
    mosa,
    randlora,
    s2lora,
    sara,
    smora,
    sora,
    svfit,
    tlora,
    wara,
)
from .base import METHODS, Adapter, Capabilities, build_config, register_method

__all__ = ["METHODS", "Adapter", "Capabilities", "build_config", "register_method"]
