"""Translate between lorakit's Bone config and PEFT's ``MissConfig`` JSON (``peft_type: "MISS"``).

Tensor names and shapes already agree (``<path>.miss_block``; ``(d_out / r, r, r)`` for Bat). ``init_weights``
maps to ``variant``: ``True``/``False`` -> ``"miss"``, ``"mini"`` -> ``"mini"``, ``"bat"`` -> ``"bat"`` (PEFT applies no
dropout in Bat mode, so a Bat file's ``miss_dropout`` is read as 0, which is what PEFT computes).
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
            "init_weights": config.variant if config.variant in ("mini", "bat") else True}


def from_peft(data: dict[str, Any], source: str) -> BoneConfig:
    """A :class:`BoneConfig` from PEFT's JSON (``init_weights`` ``True``/``False`` -> MiSS, ``"mini"``/``"bat"`` -> the
    variant of that name)."""
    require_type(data, "MISS", source, ("r",))
    check_keys(data, source, _READ)
    init = data.get("init_weights", True)
    if init not in (True, False, "mini", "bat"):
        raise AdapterFileError(f"{source}: init_weights={init!r} is not supported "
                               "(allowed: true, false, 'mini', 'bat')")
    variant = init if init in ("mini", "bat") else "miss"
    dropout = 0.0 if variant == "bat" else float(data.get("miss_dropout") or 0.0)  # PEFT's Bat ignores it
    try:
        return BoneConfig(r=int(data["r"]), variant=variant, mini_r=int(data.get("mini_r", 1)), dropout=dropout)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


FORMAT = PeftFormat("MISS", (BoneConfig,), to_peft, from_peft)
