"""lorakit: low-rank adaptation for any PyTorch / transformers model.

    import lorakit
    lorakit.adapt(model, lorakit.LoraConfig(r=16, targets="all-linear"))
    ...train...
    lorakit.save_adapter(model, "out/")
"""
from .config import AdapterConfig
from .errors import AdapterFileError, ConfigError, LorakitError, TargetError
from .inject import (
    active_adapters,
    adapt,
    configs,
    delete_adapter,
    disable,
    enable,
    inspect_targets,
    merge,
    route,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from .io.adapter_files import load_adapter, save_adapter
from .methods import METHODS, build_config
from .methods.dora import DoraConfig
from .methods.lora import LoraConfig, LoraFAConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterFileError", "ConfigError", "LorakitError", "TargetError", "active_adapters", "adapt",
    "configs", "delete_adapter", "disable", "enable", "inspect_targets", "merge", "route", "set_active",
    "trainable_parameters", "unload", "unmerge", "METHODS", "build_config", "DoraConfig", "LoraConfig",
    "LoraFAConfig", "load_adapter", "save_adapter",
]
