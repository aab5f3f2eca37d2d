"""LoRAM (Zhang et al., 2025; METHODS.md entry 38): train LoRA on a structurally pruned model, use it on the full one.

1. :func:`prune_mlp_channels` makes a pruned copy: each gated MLP (``gate_proj``/``up_proj`` -> ``down_proj``, the
   LLaMA family) keeps ``round((1 - ratio) * d_ff)`` intermediate channels; the kept index sets are a :class:`PruneMap`.
2. Train any adapter on the small model with the usual tools (``adapt`` + a Trainer or a plain loop).
3. :func:`recover_adapter` re-embeds it into the full model's shapes: along a pruned axis the small tensor is scattered
   to the kept coordinates and every other entry is zero — for LoRA ``B_full[I_out, :] = B``, ``A_full[:, I_in] = A``.
   The recovered ``dW`` therefore equals the small ``dW`` on the kept coordinates and is zero elsewhere; this is
   checked for every layer, so a method whose update is not preserved by zero-padding (e.g. DoRA's norm) is refused.

Assumed where the paper leaves room: channels are ranked by a magnitude score ``||W_down[:, j]|| * prod ||W_up[j, :]||``
(the paper uses LLM-Pruner and other pruners, then a short continual pre-training to align the pruned model — the
alignment is the publisher's step and not part of this module); attention heads are not pruned.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, LorakitError, require
from ..inject import adapt, configs, hosts

UP_NAMES, DOWN_NAME = ("gate_proj", "up_proj"), "down_proj"


@dataclass(frozen=True)
class PruneMap:
    """Per pruned ``nn.Linear`` (by module path): the kept output rows and kept input columns (``None``: all kept)."""

    kept: dict[str, tuple[Tensor | None, Tensor | None]]


def _slice_linear(linear: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> nn.Linear:
    w = linear.weight.detach()
    w = w if rows is None else w.index_select(0, rows)
    w = w if cols is None else w.index_select(1, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias if rows is None else linear.bias.index_select(0, rows))
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


@torch.no_grad()
def prune_mlp_channels(model: nn.Module, ratio: float) -> tuple[nn.Module, PruneMap]:
    """A pruned deep copy of ``model`` (the original is untouched) and the kept indices of every pruned layer."""
    require(0.0 <= ratio < 1.0, "ratio", ratio, "must be in [0, 1)")
    small = copy.deepcopy(model)
    kept: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    width = None
    for path, mlp in small.named_modules():
        ups = [getattr(mlp, n) for n in UP_NAMES if isinstance(getattr(mlp, n, None), nn.Linear)]
        down = getattr(mlp, DOWN_NAME, None)
        if not ups or not isinstance(down, nn.Linear):
            continue
        score = down.weight.float().norm(dim=0)
        for up in ups:
            score = score * up.weight.float().norm(dim=1)
        width = max(1, round((1.0 - ratio) * score.numel()))
        channels = score.topk(width).indices.sort().values
        prefix = f"{path}." if path else ""
        for name in UP_NAMES:
            if isinstance(getattr(mlp, name, None), nn.Linear):
                setattr(mlp, name, _slice_linear(getattr(mlp, name), channels, None))
                kept[prefix + name] = (channels, None)
        mlp.down_proj = _slice_linear(down, None, channels)
        kept[prefix + DOWN_NAME] = (None, channels)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    if not kept:
        raise ConfigError(f"prune_mlp_channels: the model has no gated MLP ({'/'.join(UP_NAMES)} -> {DOWN_NAME})")
    if hasattr(getattr(small, "config", None), "intermediate_size"):
        small.config.intermediate_size = width
    return small, PruneMap(kept)


def _scatter(small: Tensor, full_shape: torch.Size, axes: dict[int, Tensor]) -> Tensor:
    out = small
    for dim, index in axes.items():
        shape = list(out.shape)
        shape[dim] = full_shape[dim]
        out = out.new_zeros(shape).index_copy_(dim, index.to(out.device), out)
    return out


def _axes(small: Tensor, full: Tensor, rows: Tensor | None, cols: Tensor | None, d_out: int, d_in: int,
          what: str) -> dict[int, Tensor]:
    axes: dict[int, Tensor] = {}
    for dim, (s, f) in enumerate(zip(small.shape, full.shape)):
        if s == f:
            continue
        if rows is not None and s == rows.numel() and f == d_out and not (cols is not None and f == d_in):
            axes[dim] = rows
        elif cols is not None and s == cols.numel() and f == d_in and not (rows is not None and f == d_out):
            axes[dim] = cols
        else:
            raise LorakitError(f"recover_adapter: cannot tell which pruned axis dim {dim} of {what} follows "
                               f"({tuple(small.shape)} -> {tuple(full.shape)})")
    return axes


@torch.no_grad()
def recover_adapter(small: nn.Module, full: nn.Module, prune_map: PruneMap, name: str = "default") -> nn.Module:
    """Add adapter ``name`` trained on ``small`` to ``full`` (same config), re-embedded at the kept coordinates."""
    if name not in configs(small):
        raise LorakitError(f"recover_adapter: the pruned model has no adapter {name!r}; it has "
                           f"{sorted(configs(small))}")
    adapt(full, configs(small)[name], name)
    full_hosts = {h.path: h for h in hosts(full)}
    for host in hosts(small):
        if name not in host.adapters:
            continue
        target = full_hosts[host.path]
        rows, cols = prune_map.kept.get(host.path, (None, None))
        d_out, d_in = target.base_layer.weight.shape[:2]
        source, dest = host.adapters[name], target.adapters[name]
        full_tensors = dict(dest.state_dict(keep_vars=True))
        for key, t in source.state_dict(keep_vars=True).items():
            axes = _axes(t, full_tensors[key], rows, cols, d_out, d_in, f"{host.path}.{key}")
            full_tensors[key].copy_(_scatter(t.detach(), full_tensors[key].shape, axes))
        _check_exact(source.delta_weight(host.backend), dest.delta_weight(target.backend), rows, cols, host.path)
    return full


def _check_exact(small: Tensor, full: Tensor, rows: Tensor | None, cols: Tensor | None, path: str) -> None:
    expected = _scatter(small, full.shape, {d: i for d, i in ((0, rows), (1, cols)) if i is not None})
    if not torch.allclose(full, expected, rtol=1e-5, atol=1e-6 * float(small.abs().max().clamp_min(1e-12))):
        raise LorakitError(f"recover_adapter: at {path!r} the method's update is not preserved by re-embedding the "
                           f"pruned tensors (only pure low-rank-factor methods such as LoRA recover exactly)")
