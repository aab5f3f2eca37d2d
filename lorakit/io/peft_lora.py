"""Translate between lorakit's LoRA-family configs and PEFT's ``LoraConfig`` JSON (``peft_type: "LORA"``)."""
from __future__ import annotations

from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterFileError
from ..init.linalg import MAX_NITER
from ..methods.dora import DoraConfig
from ..methods.lora import LoraConfig, LoraFAConfig
from .peft_format import PeftFormat, check_keys, require_type

_READ = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern",
         "fan_in_fan_out", "init_lora_weights"}
# Keys PEFT writes that carry no meaning for a saved adapter's outputs.
_INERT = {"loftq_config", "megatron_config", "megatron_core", "eva_config", "corda_config", "lora_ga_config",
          "kasa_config", "monteclora_config", "velora_config", "arrow_config", "qalora_group_size",
          "ensure_weight_tying"}
# Keys that change outputs when set: refuse rather than load something that computes differently.
_UNSUPPORTED_WHEN_SET = {
    "layer_replication": None, "use_qalora": False, "use_bdlora": None, "target_parameters": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None,
}


def to_peft(config: AdapterConfig, fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` fields for ``config`` (LoRA, rsLoRA, DoRA; LoRA-FA is LoRA with a frozen ``A``)."""
    assert isinstance(config, LoraConfig)
    return {"exclude_modules": None, "fan_in_fan_out": fan_in_fan_out,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "use_dora": isinstance(config, DoraConfig), "lora_bias": config.lora_bias,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": _peft_init(config),
    }


# PEFT ``init_lora_weights`` values that leave the base weight untouched: the file's tensors say everything.
_PLAIN_INITS = (True, False, "gaussian", "eva")


def _peft_init(config: LoraConfig) -> bool | str:
    """PEFT's ``init_lora_weights`` for inits that rewrite the base from the weight alone, so PEFT redoes them."""
    if config.init == "olora":
        return "olora"
    if config.init == "pissa":
        niter = config.init_options.get("niter")
        return "pissa" if niter is None else f"pissa_niter_{niter}"
    return True


def _init_from_peft(value: Any, source: str) -> dict[str, Any]:
    """lorakit ``init`` / ``init_options`` that rebuild the residual base PEFT's init left, or a clear refusal."""
    if value in _PLAIN_INITS:
        return {}
    if value in ("pissa", "olora"):
        return {"init": value}
    if isinstance(value, str) and value.startswith("pissa_niter_") and value[len("pissa_niter_"):].isdigit():
        niter = int(value[len("pissa_niter_"):])
        if not niter <= MAX_NITER:  # a file's number of SVD passes is untrusted: bound the work it orders
            raise AdapterFileError(f"{source}: init_lora_weights={value!r}: the number of subspace iterations must "
                                   f"be at most {MAX_NITER}")
        return {"init": "pissa", "init_options": {"niter": niter}}
    raise AdapterFileError(
        f"{source}: init_lora_weights={value!r} rewrote the base model in a way lorakit cannot redo on load; "
        "supported: true, false, 'gaussian', 'eva', 'pissa', 'pissa_niter_<n>', 'olora' (convert the adapter with "
        "PEFT's path_initial_model_for_weight_conversion first)"
    )


def from_peft(data: dict[str, Any], source: str) -> LoraConfig:
    """A lorakit config from PEFT's JSON; unknown keys warn, keys that change outputs in unsupported ways fail."""
    require_type(data, "LORA", source, ("r", "lora_alpha"))
    check_keys(data, source, _READ | _INERT, _UNSUPPORTED_WHEN_SET)
    cls = DoraConfig if data.get("use_dora") else LoraConfig
    try:
        return cls(
            r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout") or 0.0),
            use_rslora=bool(data.get("use_rslora", False)), lora_bias=bool(data.get("lora_bias", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}), alpha_pattern=dict(data.get("alpha_pattern") or {}),
            **_init_from_peft(data.get("init_lora_weights", True), source),
        )
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


FORMAT = PeftFormat("LORA", (LoraConfig, LoraFAConfig, DoraConfig), to_peft, from_peft)
