"""Translate between lorakit's RandLoRA and PEFT's ``RandLoraConfig`` files (``peft_type: "RANDLORA"``).

lorakit keeps the shared random bases once (``lorakit_shared.randlora_A`` / ``randlora_B``) and writes them once,
under PEFT's model-level keys ``base_model.randlora_A`` / ``randlora_B``. PEFT's own files also repeat them under
every adapted layer; PEFT loads ours correctly from the model-level keys (its per-layer buffers are the same
tensor), though it warns that the per-layer copies are missing. On reading, all copies must agree; one is kept.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import AdapterConfig
from ..errors import AdapterFileError
from ..methods.randlora import RandLoraConfig
from .peft_format import PeftFormat, Tensors, check_keys, require_type

_READ = {"r", "randlora_alpha", "randlora_dropout", "projection_prng_key", "save_projection", "fan_in_fan_out",
         "init_weights"}
_UNSUPPORTED_WHEN_SET = {"sparse": False, "very_sparse": False}
_BASES = ("randlora_A", "randlora_B")
_SHARED, _PEFT_SHARED, _LAYER = "lorakit_shared.", "base_model.", "base_model.model."


def to_peft(config: AdapterConfig, fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's ``RandLoraConfig`` fields for a :class:`RandLoraConfig`."""
    assert isinstance(config, RandLoraConfig)
    return {"r": config.r, "randlora_alpha": config.alpha, "randlora_dropout": config.dropout,
            "projection_prng_key": config.projection_prng_key, "save_projection": config.save_projection,
            "fan_in_fan_out": fan_in_fan_out, "init_weights": True, **_UNSUPPORTED_WHEN_SET}


def from_peft(data: dict[str, Any], source: str) -> RandLoraConfig:
    """A :class:`RandLoraConfig` from PEFT's JSON; sparse bases are refused (not implemented here)."""
    require_type(data, "RANDLORA", source, ("r",))
    check_keys(data, source, _READ, _UNSUPPORTED_WHEN_SET)
    try:
        return RandLoraConfig(r=int(data["r"]), alpha=float(data.get("randlora_alpha", 640)),
                              dropout=float(data.get("randlora_dropout") or 0.0),
                              projection_prng_key=int(data.get("projection_prng_key", 0)),
                              save_projection=bool(data.get("save_projection", True)))
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


def to_file(tensors: Tensors, config: AdapterConfig) -> Tensors:
    """Shared bases (when saved at all) go under PEFT's model-level keys, once."""
    return {(_PEFT_SHARED + k.removeprefix(_SHARED) if k.startswith(_SHARED) else k): v for k, v in tensors.items()}


def from_file(tensors: Tensors, config: AdapterConfig) -> Tensors:
    """Keep one copy of each shared basis under ``lorakit_shared.``; the copies must be identical."""
    out = {k: v for k, v in tensors.items() if not k.endswith(_BASES) or not k.startswith((_PEFT_SHARED, _LAYER))}
    for name in _BASES:
        copies = {k: v for k, v in tensors.items() if k == _PEFT_SHARED + name or k.endswith("." + name)}
        if not copies:
            continue
        first_key, first = next(iter(copies.items()))
        for key, value in copies.items():
            if value.shape != first.shape or not torch.equal(value, first):
                raise AdapterFileError(f"shared RandLoRA basis {key} differs from {first_key}: inconsistent file")
        out[_SHARED + name] = first
    return out


FORMAT = PeftFormat("RANDLORA", (RandLoraConfig,), to_peft, from_peft, to_file, from_file)
