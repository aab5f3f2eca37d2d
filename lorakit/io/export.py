"""Export an adapter whose initialisation rewrote the base (PiSSA, OLoRA, LoRA-GA) as a LoRA on the original base.

The PiSSA paper's conversion (section 4, "conversion to LoRA"; PEFT's ``path_initial_model_for_weight_conversion``):
with the base rewritten to ``W_res = W - s B0 A0`` and the adapter trained to ``B, A``,

    W_res + s B A - W = s (B A - B0 A0) = s [B, -B0] [A; A0]

a rank-``2r`` LoRA with the same scale (``alpha`` scaled with ``r``), which PEFT or a server applies to the stock
model. Other tensors (DoRA's magnitude, ``lora_bias``) are copied: DoRA's direction ``W + s B' A'`` is the same
matrix as ``W_res + s B A``, so its magnitude carries over. Layers without a recorded ``B0, A0`` get zero blocks.

Every other adapter whose update is exactly low rank (``Capabilities.factorable``: LoRA, LoRA-XS / LoRA-SB, SLoRA,
pruned SoRA / AdaLoRA, grown IncreLoRA, DyLoRA at its current rank, ...) is exported from its
:meth:`~lorakit.methods.base.Adapter.factors` ``delta = B_eff A_eff`` as a LoRA with each layer's own rank and scale
1 (``rank_pattern``, ``alpha_pattern`` with ``alpha_l = r_l``), so PEFT and any LoRA server can use it; layers of rank
0 add nothing and are left out (SoRA's "compact" LoRA).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import require
from ..hosts.host import HostLayer, adapters_named
from ..inject import adapt, config_of, configs, delete_adapter
from ..methods.lora import Lora, LoraConfig
from ..modules_to_save import saved_modules
from .adapter_files import save_adapter


def export_lora(model: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` as a plain LoRA/DoRA (rank ``2r``) relative to the unmodified base weights."""
    config = config_of(model, name)
    layers = [h for h, _ in adapters_named(model, name)]
    rewrote = any(name in h.rewriters for h in layers)  # the base differs from the stock one: the LoRA path below
    # handles (a residual initialisation) or refuses (a replaced base) it
    if not rewrote and all(h.adapters[name].capabilities.factorable for h in layers):
        return _export_factors(model, directory, name, layers, config.modules_to_save)
    require(isinstance(config, LoraConfig) and all(isinstance(h.adapters[name], Lora) for h in layers), "adapter",
            name, f"must be LoRA-family or exactly low rank to export as LoRA (it is {type(config).__name__}, "
                  f"built as {type(layers[0].adapters[name]).__name__})")
    for host in layers:
        require(not host.adapters[name].base_replaced, "adapter", name,
                f"replaced the base of {host.path!r} by a quantised weight (LoftQ); it is only valid on that base")
    scale_up = math.sqrt(2) if config.use_rslora else 2.0  # keeps alpha / r (or alpha / sqrt(r)) with r -> 2r
    doubled = config.replace(
        r=2 * config.r, alpha=config.alpha * scale_up, init="kaiming", init_options={},
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * scale_up for k, v in config.alpha_pattern.items()},
        targets=tuple(h.path for h in layers), exclude=(),
    )
    return _save_as(model, directory, doubled, layers, lambda host, tmp: _fill(host.adapters[tmp], host.adapters[name]),
                    name)


def _save_as(model: nn.Module, directory: str | Path, config: LoraConfig, layers: list[HostLayer],
             fill: Callable[[HostLayer, str], None], source: str) -> Path:
    """Save a temporary LoRA adapter built from ``config`` on ``layers``, filled by ``fill(host, its name)`` and
    holding adapter ``source``'s copies of its modules to save."""
    tmp = _free_name(model)
    adapt(model, config, tmp, activate=False, freeze_base=False)
    try:
        for host in layers:
            fill(host, tmp)
        copy_saved_modules(model, source, tmp)
        return save_adapter(model, directory, tmp)
    finally:
        delete_adapter(model, tmp)


def _export_factors(model: nn.Module, directory: str | Path, name: str, layers: list[HostLayer],
                    modules_to_save: Sequence[str]) -> Path:
    """A factorable adapter as a LoRA with ``B = B_eff``, ``A = A_eff`` and scale 1 on every layer (and the
    adapter's copies of its modules to save)."""
    require(all(h.adapters[name].reproducible_from_file for h in layers), "adapter", name,
            "rewrote its base weights, so its factors alone do not describe it relative to the stock base")
    tmp = _free_name(model)
    attach_factors(model, tmp, {h.path: h.adapters[name].factors() for h in layers}, modules_to_save=modules_to_save)
    try:
        copy_saved_modules(model, name, tmp)
        return save_adapter(model, directory, tmp)
    finally:
        delete_adapter(model, tmp)


def attach_factors(model: nn.Module, name: str, factors: dict[str, tuple[Tensor, Tensor]],
                   activate: bool = False, modules_to_save: Sequence[str] = ()) -> None:
    """Add a LoRA adapter ``name`` whose update on layer ``path`` is ``up @ down`` (``factors[path]``, canonical
    layout, ``up (d_out, r)``, ``down (r, d_in)``): each layer its own rank and scale 1 (``rank_pattern``,
    ``alpha_pattern``), so PEFT and any LoRA server load it. Layers of rank 0 are left out."""
    factors = {p: f for p, f in factors.items() if f[1].shape[0] > 0}
    require(bool(factors), "factors", name, "have rank 0 on every layer; there is nothing to add")
    # longest paths first: a pattern matches any module whose name ends with it and the first match wins (PEFT's rule
    # too), so `up` listed before `block.up` would give `block.up` the rank of `up`
    keys = {p: re.escape(p) for p in sorted(factors, key=len, reverse=True)}
    ranks = {p: factors[p][1].shape[0] for p in keys}
    top = max(ranks.values())
    config = LoraConfig(r=top, alpha=float(top), targets=tuple(keys),
                        rank_pattern={keys[p]: r for p, r in ranks.items()},
                        alpha_pattern={keys[p]: float(r) for p, r in ranks.items()}, modules_to_save=modules_to_save)
    adapt(model, config, name, activate=activate, freeze_base=False)
    with torch.no_grad():
        for host, out in adapters_named(model, name, Lora):
            up, down = factors[host.path]
            if host.geometry.kind == "embedding":  # Lora: delta (num, dim) = A^T B^T
                out.a.copy_(up.t()), out.b.copy_(down.t())
            else:
                out.b.copy_(up.reshape(out.b.shape)), out.a.copy_(down.reshape(out.a.shape))


@torch.no_grad()
def copy_saved_modules(model: nn.Module, source: str, target: str) -> None:
    """Give adapter ``target`` the values of adapter ``source``'s copies of its modules to save."""
    for wrapper in saved_modules(model):
        if source in wrapper.modules_to_save:
            wrapper.modules_to_save[target].load_state_dict(wrapper.modules_to_save[source].state_dict())


def _free_name(model: nn.Module) -> str:
    tmp = "export"
    while tmp in configs(model):
        tmp += "_"
    return tmp


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
