"""Where a run computes: ``--device auto|cpu|cuda[:i]|mps`` and the base model's dtype that goes with it.

``auto`` is the accelerator when there is one (under ``torchrun``: this process's GPU, ``cuda:$LOCAL_RANK``), else
the CPU. The base model is loaded in bfloat16 on a GPU that supports it and in float32 elsewhere (CPUs without fast
bf16 matmuls run bf16 several times slower than fp32), unless ``--bf16`` / ``--no-bf16`` says otherwise; adapters
stay float32 in both cases.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import DataError

DEVICE_SYNTAX = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:<index> or mps"


def check_device_spec(spec: str) -> None:
    """Refuse a ``--device`` value that is not one of :data:`DEVICE_CHOICES` (availability is checked later)."""
    if not DEVICE_SYNTAX.fullmatch(spec):
        raise DataError(f"--device {spec!r} is invalid; use {DEVICE_CHOICES}")


def resolve_device(spec: str = "auto") -> torch.device:
    """The device ``spec`` names on this machine; under ``torchrun`` a bare ``cuda`` (or ``auto``) is this process's
    GPU, ``cuda:$LOCAL_RANK``. Raises a :class:`DataError` when the device is not available here."""
    check_device_spec(spec)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DataError(f"--device {spec}: no CUDA device is available here; use --device cpu (or auto)")
        index = int(spec.partition(":")[2] or local)
        if index >= torch.cuda.device_count():
            raise DataError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"indices 0..{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if spec == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device mps: no Apple GPU is available here; use --device cpu (or auto)")
    return torch.device(spec)


def base_dtype(device: torch.device, bf16: bool | None = None) -> torch.dtype:
    """The base model's dtype: ``bf16`` when given, else bfloat16 on a GPU with fast bf16 and float32 elsewhere."""
    if bf16 is not None:
        return torch.bfloat16 if bf16 else torch.float32
    fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if fast else torch.float32


def model_device(model: nn.Module) -> torch.device:
    """``model.device`` when it has one (transformers and PEFT models, stand-ins such as multi-job training's
    replayed logits), else the device of its first parameter (the CPU for a model without any)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def on_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``batch`` with every tensor on ``device`` (no copy for those already there)."""
    return {k: v.to(device) for k, v in batch.items()}
