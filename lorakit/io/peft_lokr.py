"""Translate between lorakit's Kronecker config and PEFT's ``LoKrConfig`` JSON (``peft_type: "LOKR"``).

Tensor names and shapes already agree (``<path>.lokr_w1``, ``lokr_w2`` / ``lokr_w2_a``, ``lokr_w2_b``, ...).
"""
from __future__ import annotations

from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterFileError
from ..methods.kron import KronConfig
from .peft_format import PeftFormat, check_keys, require_type

_INIT_TO_PEFT: dict[str, bool | str] = {"default": True, "lycoris": "lycoris", "random": False}
_READ = {"r", "alpha", "decompose_factor", "decompose_both", "init_weights"}
# Training-time regularisers and layouts lorakit's Kronecker adapter does not implement.
_UNSUPPORTED_WHEN_SET = {"rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False,
                         "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {}}


def to_peft(config: AdapterConfig, fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's ``LoKrConfig`` fields for a :class:`KronConfig` (PEFT's LoKr has no ``fan_in_fan_out``)."""
    assert isinstance(config, KronConfig)
    return {"exclude_modules": None, "r": config.r, "alpha": config.alpha, "decompose_factor": config.decompose_factor,
            "decompose_both": config.decompose_both, "init_weights": _INIT_TO_PEFT[config.init],
            **_UNSUPPORTED_WHEN_SET}


def from_peft(data: dict[str, Any], source: str) -> KronConfig:
    """A :class:`KronConfig` from PEFT's JSON; settings that change outputs and are not supported fail."""
    require_type(data, "LOKR", source, ("r", "alpha"))
    check_keys(data, source, _READ, _UNSUPPORTED_WHEN_SET)
    init = next((k for k, v in _INIT_TO_PEFT.items() if v == data.get("init_weights", True)), "default")
    try:
        return KronConfig(r=int(data["r"]), alpha=float(data["alpha"]),
                          decompose_factor=int(data.get("decompose_factor", -1)),
                          decompose_both=bool(data.get("decompose_both", False)), init=init)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


FORMAT = PeftFormat("LOKR", (KronConfig,), to_peft, from_peft)
