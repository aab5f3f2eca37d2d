"""lorakit: low-rank adaptation for any PyTorch / transformers model.

    import lorakit
    lorakit.adapt(model, lorakit.LoraConfig(r=16, targets="all-linear"))
    ...train...
    lorakit.save_adapter(model, "out/")
"""
from . import (
    compose,  # noqa: F401  (registers AutoLoRA's router kind)
    mixtures,  # noqa: F401  (registers the mixtures' router kinds)
    rank,  # noqa: F401  (registers the rank-allocation methods' training rules)
)
from .config import AdapterConfig
from .data_init import initialize
from .errors import AdapterFileError, ConfigError, LorakitError, TargetError
from .init import INITS
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
    set_scale,
    trainable_parameters,
    unload,
    unmerge,
    using,
)
from .io.adapter_files import load_adapter, save_adapter
from .io.export import export_lora
from .methods import METHODS, build_config
from .methods.adalora import AdaLoraConfig, IncreLoraConfig
from .methods.block_lora import BlockLoraConfig
from .methods.bone import BoneConfig
from .methods.compacter import CompacterConfig
from .methods.cp_lora import CpDoraConfig, CpLoraConfig
from .methods.dora import DoraConfig
from .methods.dylora import DyLoraConfig
from .methods.flora_n import FloraNConfig
from .methods.hydra import HydraConfig
from .methods.kron import KronConfig
from .methods.lamda import LamdaConfig
from .methods.loca import LocaConfig
from .methods.loldu import LolduConfig
from .methods.lora import LoraConfig, LoraFAConfig
from .methods.lora_xs import LoraXsConfig, SloraConfig
from .methods.mos import MosConfig
from .methods.mosa import MosaConfig
from .methods.randlora import RandLoraConfig
from .methods.s2lora import S2LoraConfig
from .methods.sara import SaraConfig
from .methods.smora import SmoraConfig
from .methods.sora import SoraConfig
from .methods.svfit import SvfitConfig
from .methods.tlora import TloraConfig
from .methods.wara import WaraConfig
from .mixing import add_router, delete_router, gate_router, mix
from .pool import AdapterPool
from .quant.model import quantize, rounding_errors

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterFileError", "ConfigError", "LorakitError", "TargetError", "active_adapters", "adapt",
    "configs", "delete_adapter", "disable", "enable", "inspect_targets", "merge", "route", "set_active", "set_scale",
    "trainable_parameters", "unload", "unmerge", "METHODS", "build_config", "BoneConfig", "DoraConfig", "KronConfig",
    "LoraConfig", "LoraFAConfig", "RandLoraConfig", "load_adapter", "save_adapter",
    "INITS", "initialize", "export_lora", "LolduConfig", "LoraXsConfig", "SloraConfig", "SvfitConfig",
    "quantize", "rounding_errors",
    "BlockLoraConfig", "CpDoraConfig", "CpLoraConfig", "FloraNConfig", "HydraConfig", "LocaConfig", "TloraConfig",
    "WaraConfig",
    "CompacterConfig", "LamdaConfig", "MosConfig", "MosaConfig", "S2LoraConfig", "SaraConfig",
    "AdapterPool", "add_router", "delete_router", "gate_router", "mix", "using",
    "AdaLoraConfig", "DyLoraConfig", "IncreLoraConfig", "SoraConfig", "SmoraConfig",
]
