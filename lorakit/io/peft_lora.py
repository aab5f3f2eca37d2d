"""Translate between lorakit's LoRA-family configs and PEFT's ``LoraConfig`` JSON (``peft_type: "LORA"``)."""
from __future__ import annotations

import warnings
from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterFileError
from ..methods.dora import DoraConfig
from ..methods.lora import LoraConfig

PEFT_VERSION_WRITTEN = "0.21.2"

# Keys PEFT writes that carry no meaning for a saved adapter's outputs (or that we read ourselves).
_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "lora_bias", "rank_pattern",
         "alpha_pattern", "target_modules", "exclude_modules", "fan_in_fan_out", "init_lora_weights"}
_INERT = {"auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
          "layers_pattern", "layers_to_transform", "loftq_config", "megatron_config", "megatron_core", "eva_config",
          "corda_config", "lora_ga_config", "kasa_config", "monteclora_config", "velora_config", "arrow_config",
          "qalora_group_size", "ensure_weight_tying", "target_parameters", "alora_invocation_tokens",
          "trainable_token_indices", "layer_replication", "modules_to_save", "use_qalora", "use_bdlora", "bias"}
# Inert keys that change outputs when set: refuse rather than load something that computes differently.
_UNSUPPORTED_WHEN_SET = {
    "bias": "none", "modules_to_save": None, "layer_replication": None, "use_qalora": False, "use_bdlora": None,
    "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
}


def to_peft(config: AdapterConfig, target_modules: list[str] | str, fan_in_fan_out: bool,
            base_model: str | None) -> dict[str, Any] | None:
    """PEFT's ``adapter_config.json`` for ``config``, or ``None`` when PEFT has no equivalent method."""
    if not isinstance(config, LoraConfig):
        return None
    return {
        "peft_type": "LORA", "peft_version": PEFT_VERSION_WRITTEN, "task_type": None, "inference_mode": True,
        "base_model_name_or_path": base_model, "revision": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "use_dora": isinstance(config, DoraConfig), "lora_bias": config.lora_bias, "bias": "none",
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "target_modules": target_modules, "exclude_modules": None, "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def from_peft(data: dict[str, Any], source: str) -> LoraConfig:
    """A lorakit config from PEFT's JSON; unknown keys warn, keys that change outputs in unsupported ways fail."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(f"{source}: peft_type={peft_type!r} is not supported; lorakit reads 'LORA'")
    for key, default in _UNSUPPORTED_WHEN_SET.items():
        value = data.get(key, default)
        if value not in (default, None, [], {}, False) and not (key == "bias" and value == "none"):
            raise AdapterFileError(f"{source}: {key}={value!r} is not supported (allowed: {default!r})")
    unknown = sorted(set(data) - _READ - _INERT)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown adapter_config keys {unknown}", stacklevel=3)
    if "r" not in data or "lora_alpha" not in data:
        raise AdapterFileError(f"{source}: a LORA config needs 'r' and 'lora_alpha'")
    cls = DoraConfig if data.get("use_dora") else LoraConfig
    try:
        return cls(
            r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout") or 0.0),
            use_rslora=bool(data.get("use_rslora", False)), lora_bias=bool(data.get("lora_bias", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}), alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
