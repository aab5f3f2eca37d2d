"""lorakit: low-rank adaptation for any PyTorch / transformers model.

    import lorakit
    lorakit.adapt(model, lorakit.LoraConfig(r=16, targets="all-linear"))
    ...train...
    lorakit.save_adapter(model, "out/")
"""
from .config import AdapterConfig
from .errors import AdapterFileError, ConfigError, LorakitError, TargetError
from .init import INITS
from .init.data import initialize
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
from .io.export import export_lora
from .methods import METHODS, build_config
from .methods.bone import BoneConfig
from .methods.dora import DoraConfig
from .methods.kron import KronConfig
from .methods.loldu import LolduConfig
from .methods.lora import LoraConfig, LoraFAConfig
from .methods.lora_xs import LoraXsConfig, SloraConfig
from .methods.randlora import RandLoraConfig
from .methods.svfit import SvfitConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterFileError", "ConfigError", "LorakitError", "TargetError", "active_adapters", "adapt",
    "configs", "delete_adapter", "disable", "enable", "inspect_targets", "merge", "route", "set_active",
    "trainable_parameters", "unload", "unmerge", "METHODS", "build_config", "BoneConfig", "DoraConfig", "KronConfig",
    "LoraConfig", "LoraFAConfig", "RandLoraConfig", "load_adapter", "save_adapter",
    "INITS", "initialize", "export_lora", "LolduConfig", "LoraXsConfig", "SloraConfig", "SvfitConfig",
]
