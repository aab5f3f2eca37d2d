"""Export an adapter whose initialisation rewrote the base (PiSSA, OLoRA, LoRA-GA) as a LoRA on the original base.

The PiSSA paper's conversion (section 4, "conversion to LoRA"; PEFT's ``path_initial_model_for_weight_conversion``):
with the base rewritten to ``W_res = W - s B0 A0`` and the adapter trained to ``B, A``,

    W_res + s B A - W = s (B A - B0 A0) = s [B, -B0] [A; A0]

a rank-``2r`` LoRA with the same scale (``alpha`` scaled with ``r``), which PEFT or a server applies to the stock
model. Other tensors (DoRA's magnitude, ``lora_bias``) are copied: DoRA's direction ``W + s B' A'`` is the same
matrix as ``W_res + s B A``, so its magnitude carries over. Layers without a recorded ``B0, A0`` get zero blocks.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import LorakitError, require
from ..inject import adapt, configs, delete_adapter, hosts
from ..methods.lora import Lora, LoraConfig
from .adapter_files import save_adapter


def export_lora(model: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` as a plain LoRA/DoRA (rank ``2r``) relative to the unmodified base weights."""
    known = configs(model)
    if name not in known:
        raise LorakitError(f"unknown adapter {name!r}; this model has: {sorted(known) or 'none'}")
    config = known[name]
    require(isinstance(config, LoraConfig), "adapter", name,
            f"must be a LoRA-family adapter to export as LoRA (it is {type(config).__name__})")
    layers = [h for h in hosts(model) if name in h.adapters]
    for host in layers:
        require(not host.adapters[name].base_replaced, "adapter", name,
                f"replaced the base of {host.path!r} by a quantised weight (LoftQ); it is only valid on that base")
    scale_up = math.sqrt(2) if config.use_rslora else 2.0  # keeps alpha / r (or alpha / sqrt(r)) with r -> 2r
    doubled = config.replace(
        r=2 * config.r, alpha=config.alpha * scale_up, init="kaiming", init_options={},
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * scale_up for k, v in config.alpha_pattern.items()},
        targets="(?:" + "|".join(re.escape(h.path) for h in layers) + ")", exclude=(),
    )
    tmp = f"{name}_export"
    while tmp in known:
        tmp += "_"
    adapt(model, doubled, tmp, activate=False, freeze_base=False)
    try:
        for host in layers:
            _fill(host.adapters[tmp], host.adapters[name])
        return save_adapter(model, directory, tmp)
    finally:
        delete_adapter(model, tmp)


@torch.no_grad()
def _fill(out: Lora, src: Lora) -> None:
    """``out.A = [A; A0]``, ``out.B = [B, -B0]``, every other tensor copied from ``src``."""
    a0 = getattr(src, "init_lora_A", torch.zeros_like(src.a))
    b0 = getattr(src, "init_lora_B", torch.zeros_like(src.b))
    factor_ids = {id(out.a), id(out.b)}
    targets = dict(out.named_parameters())
    for key, value in src.named_parameters():
        if id(targets[key]) not in factor_ids:
            targets[key].copy_(value)
    out.a.copy_(torch.cat([src.a, a0.to(src.a.dtype)], dim=0))  # (2r, d_in[, *kernel])
    out.b.copy_(torch.cat([src.b, -b0.to(src.b.dtype)], dim=1))  # (d_out, 2r[, 1...])
