"""Translate between lorakit's Bone config and PEFT's ``MissConfig`` JSON (``peft_type: "MISS"``).

Tensor names and shapes already agree (``<path>.miss_block``). PEFT's ``init_weights="bat"`` (block affine,
``W0``-dependent) is refused: lorakit does not implement that form (see :mod:`lorakit.methods.bone`).
"""
from __future__ import annotations

from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterFileError
from ..methods.bone import BoneConfig
from .peft_format import PeftFormat, check_keys, require_type

_READ = {"r", "mini_r", "miss_dropout", "init_weights"}


def to_peft(config: AdapterConfig, fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's ``MissConfig`` fields for a :class:`BoneConfig`."""
    assert isinstance(config, BoneConfig)
    return {"exclude_modules": None, "r": config.r, "mini_r": config.mini_r, "miss_dropout": config.dropout,
            "init_weights": "mini" if config.variant == "mini" else True}


def from_peft(data: dict[str, Any], source: str) -> BoneConfig:
    """A :class:`BoneConfig` from PEFT's JSON (``init_weights`` ``True``/``False`` -> MiSS, ``"mini"`` -> mini)."""
    require_type(data, "MISS", source, ("r",))
    check_keys(data, source, _READ)
    init = data.get("init_weights", True)
    if init not in (True, False, "mini"):
        raise AdapterFileError(f"{source}: init_weights={init!r} is not supported (allowed: true, false, 'mini')")
    try:
        return BoneConfig(r=int(data["r"]), variant="mini" if init == "mini" else "miss",
                          mini_r=int(data.get("mini_r", 1)), dropout=float(data.get("miss_dropout") or 0.0))
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


FORMAT = PeftFormat("MISS", (BoneConfig,), to_peft, from_peft)
