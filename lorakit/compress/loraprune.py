"""LoRAPrune (Zhang et al., 2023; METHODS.md entry 74): structured pruning guided by LoRA's weights and gradients.

A layer adapted by LoRA computes with the merged weight ``W' = W + s B A`` (``W`` frozen, ``(d_out, d_in)``). The
gradient of ``W'`` is estimated from the LoRA gradients alone (the paper's LoRA-guided criterion)::

    G ≈ s (∂L/∂B · A + B · ∂L/∂A)                                    (d_out, d_in)

so ``W`` keeps ``requires_grad=False`` and its dense gradient is never allocated (``G`` is formed in row blocks of
at most ``_CHUNK`` elements). The importance of a weight group ``g`` and its moving average over steps are::

    Î_g = Σ_{(i, j) ∈ g} |(W + s B A) ⊙ G|_ij,        Ī_g ← β Ī_g + (1 - β) Î_g

A group is structured (:class:`Structure`): an MLP's intermediate channel (rows of ``gate``/``up``, the column of
``down``), an attention head (its rows of ``q``/``k``/``v``, its columns of ``o``; with grouped-query attention a
key/value head and the query heads that share it) or one row of a Linear. :class:`LoraPrune` prunes iteratively:
every ``interval`` steps it masks the groups of lowest ``Ī`` until round ``k`` of ``rounds`` reaches
``sparsity * k / rounds`` of every structure. Masking zeroes the group in the base *and* in every LoRA adapter of the
layer (``B`` rows for rows, ``A`` columns for columns), so merging the LoRA into the pruned base keeps it zero;
:func:`apply_masks` with ``shrink=True`` then removes the MLP channels physically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hooks import TrainingHook
from ..hosts.host import HostLayer
from ..methods.lora import Lora

_CHUNK = 1 << 22  # elements of (W + s B A) and G formed at once for one layer


@dataclass(frozen=True)
class Member:
    """One layer's share of a structure: group ``g`` owns rows (``axis=0``) or columns (``axis=1``)
    ``[g * width, (g + 1) * width)`` of the layer's ``(d_out, d_in)`` weight."""

    path: str
    axis: int
    width: int


@dataclass(frozen=True)
class Structure:
    """Groups pruned together across coupled layers; ``kind`` is ``"mlp"`` (intermediate channels), ``"heads"`` or
    ``"rows"`` (the output channels of one Linear)."""

    name: str
    kind: str
    groups: int
    members: tuple[Member, ...]


def _weight(module: nn.Module, path: str) -> Tensor:
    """The layer's frozen weight, ``(d_out, d_in)``."""
    if isinstance(module, HostLayer):
        require(module.backend.materialized and not module.backend.quantized and module.geometry.kind == "linear",
                "layer", path, "must be a dense linear layer (LoRAPrune zeroes its base weight in place)")
        return module.backend.weight()
    require(isinstance(module, nn.Linear), "layer", path, f"must be a Linear, not a {type(module).__name__}")
    return module.weight


def find_structures(model: nn.Module, *, mlp: bool = True, heads: bool = True) -> list[Structure]:
    """The prunable structures of a LLaMA-style model: every module with ``gate_proj``/``up_proj``/``down_proj``
    (channels) and every module with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``head_dim`` (heads)."""
    found = []
    for path, module in model.named_modules():
        at = f"{path}." if path else ""
        if mlp and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            channels = _weight(module.up_proj, at + "up_proj").shape[0]
            found.append(Structure(path, "mlp", channels, (
                Member(at + "gate_proj", 0, 1), Member(at + "up_proj", 0, 1), Member(at + "down_proj", 1, 1))))
        if heads and hasattr(module, "head_dim") and all(hasattr(module, f"{n}_proj") for n in "qkvo"):
            head_dim = int(module.head_dim)
            kv_heads = _weight(module.k_proj, at + "k_proj").shape[0] // head_dim
            q_rows = _weight(module.q_proj, at + "q_proj").shape[0] // kv_heads  # query rows per key/value head
            found.append(Structure(path, "heads", kv_heads, (
                Member(at + "q_proj", 0, q_rows), Member(at + "k_proj", 0, head_dim),
                Member(at + "v_proj", 0, head_dim), Member(at + "o_proj", 1, q_rows))))
    require(bool(found), "model", type(model).__name__, "has no MLP (gate/up/down_proj) or attention "
            "(q/k/v/o_proj) module; describe the groups with Structure / linear_rows")
    return found


def linear_rows(model: nn.Module, path: str) -> Structure:
    """The output channels (rows) of the Linear at ``path``, each its own group."""
    return Structure(path, "rows", _weight(model.get_submodule(path), path).shape[0], (Member(path, 0, 1),))


def _lora(host: nn.Module, name: str, path: str) -> Lora:
    require(isinstance(host, HostLayer) and name in host.adapters, "layer", path, f"has no adapter {name!r}")
    adapter = host.adapters[name]
    require(isinstance(adapter, Lora), "adapter", name, f"on {path!r} must be a LoRA-family adapter (B A factors)")
    return adapter


def _sums(w: Tensor, lora: Lora | None, gradient: bool) -> tuple[Tensor, Tensor]:
    """Row and column sums of ``|W' ⊙ G|`` (``gradient``) or ``|W'|``, ``W' = W + s B A``: ``(d_out,), (d_in,)``."""
    d_out, d_in = w.shape
    rows = torch.zeros(d_out, device=w.device)
    cols = torch.zeros(d_in, device=w.device)
    if lora is not None:
        a, b = lora.a.float(), lora.b.float()  # (r, d_in), (d_out, r)
        grad_a = torch.zeros_like(a) if lora.a.grad is None else lora.a.grad.float()
        grad_b = torch.zeros_like(b) if lora.b.grad is None else lora.b.grad.float()
    step = max(1, _CHUNK // d_in)
    for i in range(0, d_out, step):
        block = slice(i, i + step)
        merged = (w[block].to(torch.float32, copy=True) if lora is None  # (rows, d_in): W + s B A
                  else torch.addmm(w[block].float(), b[block], a, alpha=lora.scale))
        if gradient:
            g = torch.addmm(grad_b[block] @ a, b[block], grad_a).mul_(lora.scale)  # s (∂L/∂B A + B ∂L/∂A)
            merged = merged.mul_(g)
        merged = merged.abs_()
        rows[block] = merged.sum(1)
        cols += merged.sum(0)
    return rows, cols


def _importance(model: nn.Module, name: str | None, structures: Sequence[Structure], gradient: bool,
                ) -> dict[str, Tensor]:
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for s in structures:
        total = None
        for m in s.members:
            if m.path not in cache:
                module = model.get_submodule(m.path)
                lora = _lora(module, name, m.path) if name is not None else None
                if gradient:
                    require(lora is not None and (lora.a.grad is not None or lora.b.grad is not None), "adapter", name,
                            f"has no gradients on {m.path!r}; compute LoRAPrune's importance after backward")
                cache[m.path] = _sums(_weight(module, m.path), lora, gradient)
            sums = cache[m.path][m.axis]
            require(sums.numel() == s.groups * m.width, "structure", s.name,
                    f"expects {s.groups} x {m.width} along axis {m.axis} of {m.path!r}, which has {sums.numel()}")
            part = sums.reshape(s.groups, m.width).sum(1)  # (groups,)
            total = part if total is None else total + part
        out[s.name] = total
    return out


@torch.no_grad()
def lora_importance(model: nn.Module, name: str, structures: Sequence[Structure]) -> dict[str, Tensor]:
    """``Î`` of every structure, ``(groups,)``, from the current gradients of LoRA adapter ``name``."""
    return _importance(model, name, structures, gradient=True)


@torch.no_grad()
def magnitude_importance(model: nn.Module, structures: Sequence[Structure], name: str | None = None,
                         ) -> dict[str, Tensor]:
    """The magnitude baseline ``Σ_g |W + s B A|`` (``|W|`` without ``name``), ``(groups,)`` per structure."""
    return _importance(model, name, structures, gradient=False)


def prune_masks(importance: Mapping[str, Tensor], fraction: float,
                masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Keep-masks (``True``: kept) in which ``round(fraction * groups)`` groups of each structure are pruned: those
    already pruned in ``masks`` plus the kept ones of lowest importance."""
    require(0.0 <= fraction < 1.0, "fraction", fraction, "must be in [0, 1)")
    out = {}
    for key, score in importance.items():
        keep = torch.ones(score.numel(), dtype=torch.bool) if masks is None else masks[key].clone().cpu()
        todo = math.floor(fraction * score.numel() + 0.5) - int((~keep).sum())
        if todo > 0:
            ranked = torch.where(keep, score.float().cpu(), torch.inf).argsort(stable=True)
            keep[ranked[:todo]] = False
        out[key] = keep
    return out


def _zero(module: nn.Module, path: str, axis: int, drop: Tensor) -> None:
    """Zero rows / columns ``drop`` (bool) of the layer's base weight and of every LoRA adapter on it."""
    w = _weight(module, path)
    drop = drop.to(w.device)
    w[(drop, slice(None)) if axis == 0 else (slice(None), drop)] = 0
    bias = module.backend.bias if isinstance(module, HostLayer) else module.bias
    if axis == 0 and bias is not None:
        bias[drop] = 0
    for name in module.adapters if isinstance(module, HostLayer) else ():
        lora = _lora(module, name, path)
        if axis == 0:
            lora.b[drop] = 0
            if lora.b_bias is not None:
                lora.b_bias[drop] = 0
        else:
            lora.a[:, drop] = 0


def _shrink(model: nn.Module, s: Structure, keep: Tensor) -> None:
    """Replace the members of MLP structure ``s`` by Linears without its pruned channels."""
    for m in s.members:
        old = model.get_submodule(m.path)
        require(type(old) is nn.Linear, "layer", m.path, "must be a plain Linear to shrink; merge and unload the "
                "adapters first (lorakit.unload(model, merge_active=True))")
        index = keep.repeat_interleave(m.width).nonzero().squeeze(1).to(old.weight.device)
        weight = old.weight.index_select(m.axis, index)  # (d_out', d_in')
        bias = old.bias if old.bias is None or m.axis == 1 else old.bias.index_select(0, index)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                        device=weight.device, dtype=weight.dtype).requires_grad_(old.weight.requires_grad)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        parent, _, child = m.path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def apply_masks(model: nn.Module, structures: Sequence[Structure], masks: Mapping[str, Tensor], *,
                shrink: bool = False) -> nn.Module:
    """Zero every pruned group in the base weights (and biases) and in the LoRA adapters of its layers; with
    ``shrink``, also remove the pruned channels of the ``"mlp"`` structures (heads stay zeroed). Returns ``model``."""
    for s in structures:
        require(s.name in masks and masks[s.name].shape == (s.groups,), "masks", sorted(masks),
                f"must hold a ({s.groups},) keep-mask for structure {s.name!r}")
        for m in s.members:
            drop = ~masks[s.name].repeat_interleave(m.width)
            if bool(drop.any()):
                _zero(model.get_submodule(m.path), m.path, m.axis, drop)
    if shrink:
        for s in structures:
            if s.kind == "mlp":
                _shrink(model, s, masks[s.name])
    return model


class LoraPrune(TrainingHook):
    """Iterative LoRA-guided structured pruning of the layers under adapter ``name``.

    ``before_step`` (gradients present) folds ``Î`` into ``Ī``; ``after_step`` prunes at steps ``interval, 2
    interval, ..., rounds * interval`` (round ``k`` reaches ``sparsity * k / rounds``) and re-applies the masks after
    every optimizer step, so pruned ``B`` rows / ``A`` columns stay zero.
    """

    def __init__(self, name: str, structures: Sequence[Structure], sparsity: float, interval: int = 10,
                 rounds: int = 5, beta: float = 0.9) -> None:
        require(0.0 < sparsity < 1.0, "sparsity", sparsity, "must be in (0, 1)")
        require(isinstance(interval, int) and interval >= 1, "interval", interval, "must be a positive integer")
        require(isinstance(rounds, int) and rounds >= 1, "rounds", rounds, "must be a positive integer")
        require(0.0 <= beta < 1.0, "beta", beta, "must be in [0, 1)")
        names = [s.name for s in structures]
        require(bool(names) and len(set(names)) == len(names), "structures", names, "must be non-empty and unique")
        self.name, self.structures = name, list(structures)
        self.sparsity, self.interval, self.rounds, self.beta = sparsity, interval, rounds, beta
        self.importance: dict[str, Tensor] = {}  # Ī, (groups,) per structure
        self.masks = {s.name: torch.ones(s.groups, dtype=torch.bool) for s in self.structures}

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for key, now in lora_importance(model, self.name, self.structures).items():
            old = self.importance.get(key, torch.zeros_like(now))
            self.importance[key] = self.beta * old + (1 - self.beta) * now

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        k = step // self.interval
        if step % self.interval == 0 and 1 <= k <= self.rounds:
            if not self.importance:
                raise LorakitError("LoraPrune: no importance was accumulated (before_step never ran)")
            self.masks = prune_masks(self.importance, self.sparsity * k / self.rounds, self.masks)
        self.apply_masks(model)

    def apply_masks(self, model: nn.Module, shrink: bool = False) -> nn.Module:
        """The pruned model (see :func:`apply_masks`)."""
        return apply_masks(model, self.structures, self.masks, shrink=shrink)

    def metrics(self) -> dict[str, float]:
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        return {"loraprune/sparsity": pruned / sum(m.numel() for m in self.masks.values())}

    def state_dict(self) -> dict[str, Any]:
        return {"importance": dict(self.importance), "masks": dict(self.masks)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        require(set(state.get("masks", {})) == set(self.masks), "state", sorted(state.get("masks", {})),
                f"must hold the masks of structures {sorted(self.masks)}")
        self.importance = dict(state["importance"])
        self.masks = {k: v.clone().bool().cpu() for k, v in state["masks"].items()}
        self.apply_masks(model)
