"""LoRA-Mixer (2025): routed LoRA experts on the attention input/output projections (Llama ``q/k/v/o_proj``; an SSM's
``in_proj`` / ``out_proj``), a hard-soft router, and the Specialization Balance Loss (SBL).

    names, router = add_mixer(model, 4)                           # mode 1: joint training of experts and router
    names, router = load_mixer(model, {"math": "loras/math", ...})  # mode 2: frozen experts from files, router only
    sbl = SpecializationBalanceLoss("mixer", balance=0.01, alignment=0.1)      # a TrainingHook, like RouterLosses
    sbl.set_labels(task_of_each_row)                              # (B,) expert index per row, -100: unlabelled
    with lorakit.mix(model, names, router):
        loss = model(**batch).loss + sbl.forward_loss(model)

Routing (per layer ``l``, token ``t``): ``p_t = softmax(G_l x_t / tau)``; the forward uses the hard top-k choice
(``1/k`` on each of the ``k`` largest, top-1 by default), the backward the soft ``p_t`` (straight-through; the
``hard=True`` :class:`GateRouter`). Each routed projection computes ``W x_t + sum_i w_{t,i} B_i A_i x_t``.

What the abstract leaves open, and what is assumed here:

* The SBL has no formula in the abstract. Assumed: ``SBL = balance * mean_l E * sum_i f_{l,i} P_{l,i}`` (Switch
  load balance per routed layer, 1 under uniform routing) ``+ alignment * CE(pbar_b, y_b)``, where ``pbar_b`` is row
  ``b``'s router softmax averaged over its tokens and the routed layers and ``y_b`` the expert index of its task
  (rows labelled -100, or no labels at all, leave the alignment term out). "Adaptive" is not modelled: the two
  coefficients are fixed. The router's own Switch loss is off by default (``balance=0``) so it is not counted twice.
* "Serial attention routing": the same per-layer gate design routes every projection; the paper's exact gate input
  (the projection's own input here) and expert rank are assumptions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..hooks import TrainingHook
from ..hosts.host import hosts
from ..inject import adapt, delete_adapter, routers
from ..methods.lora import LoraConfig
from ..mixing import add_router, gate_router
from ..routing.routers import ROUTER_KINDS, GateRouter, switch_balance
from .files import load_experts

ATTENTION, SSM = ("q_proj", "k_proj", "v_proj", "o_proj"), ("in_proj", "out_proj")


def projection_targets(model: nn.Module) -> list[str]:
    """The attention input/output projections of ``model``: Llama-style ``q/k/v/o_proj`` or Mamba's ``in/out_proj``."""
    leaves = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    for names in (ATTENTION, SSM):
        if set(names) <= leaves:
            return list(names)
    raise LorakitError(f"no attention projections found: LoRA-Mixer needs modules named {list(ATTENTION)} or "
                       f"{list(SSM)} (give the targets yourself through `config`)")


@ROUTER_KINDS.decorator("mixer")
class MixerRouter(GateRouter):
    """A :class:`GateRouter` (hard-soft by default) that also keeps, per layer and for the latest training forward,
    its softmax by token ``(*tokens, N_l)`` and routed weights, which :class:`SpecializationBalanceLoss` takes."""

    kind = "mixer"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: dict[str, tuple[Tensor, Tensor]] = {}
        self._tokens: tuple[int, ...] = ()

    def forward(self, path: str, x: Tensor) -> Tensor:
        self._tokens = tuple(x.shape[:-1])
        return super().forward(path, x)

    def _record(self, path: str, logits: Tensor, probs: Tensor, kept: Tensor) -> None:
        super()._record(path, logits, probs, kept)
        self.records[path] = (probs.reshape(*self._tokens, probs.shape[-1]), kept)

    def pop_records(self) -> dict[str, tuple[Tensor, Tensor]]:
        records, self.records = self.records, {}
        return records


def _mixer_router(model: nn.Module, names: Sequence[str], top_k: int | None, **options: Any) -> MixerRouter:
    options.setdefault("hard", True)
    gate = gate_router(model, names, top_k, **options)
    weight = next(gate.parameters())
    return MixerRouter(**gate.config()).to(device=weight.device, dtype=weight.dtype)


def add_mixer(model: nn.Module, experts: int, config: AdapterConfig | None = None, router: str = "mixer",
              top_k: int | None = None, **options: Any) -> tuple[list[str], MixerRouter]:
    """Mode 1: ``experts`` new trainable LoRA experts ``<router>_0 ..`` (``config``, default rank-8 LoRA on
    :func:`projection_targets`) and a hard-soft router over them; both train."""
    require(isinstance(experts, int) and experts >= 1, "experts", experts, "must be a positive integer")
    config = config or LoraConfig(r=8, alpha=8, targets=projection_targets(model))
    names = [f"{router}_{i}" for i in range(experts)]
    for name in names:
        adapt(model, config, name, activate=False)
    return names, add_router(model, router, _mixer_router(model, names, top_k, **options))


def load_mixer(model: nn.Module, folders: Mapping[str, str | Path], router: str = "mixer", top_k: int | None = None,
               targets: Sequence[str] | None = None, **options: Any) -> tuple[list[str], MixerRouter]:
    """Mode 2: the PEFT folders as frozen experts and a hard-soft router over them (only the router trains). Every
    layer an expert adapts must be one of ``targets`` (default :func:`projection_targets`)."""
    allowed = set(targets or projection_targets(model))
    names = load_experts(model, folders, frozen=True)
    wrong = sorted({h.path for h in hosts(model) for n in names if n in h.adapters
                    and h.path.rpartition(".")[2] not in allowed})
    if wrong:
        for name in names:
            delete_adapter(model, name)
        raise LorakitError(f"LoRA-Mixer routes only the projections {sorted(allowed)}; the expert folders also adapt "
                           f"{wrong[:4]} (load experts made for those projections, or pass `targets`)")
    return names, add_router(model, router, _mixer_router(model, names, top_k, **options))


class SpecializationBalanceLoss(TrainingHook):
    """``balance * (Switch load balance, mean over layers) + alignment * CE(row-mean router softmax, row task)``
    of mixer router ``router``'s latest training forward (see the module docstring); ``None`` when it recorded
    nothing (eval mode). Set each batch's labels with :meth:`set_labels` before its forward."""

    def __init__(self, router: str = "mixer", balance: float = 0.01, alignment: float = 0.1) -> None:
        require(balance >= 0 and alignment >= 0, "balance / alignment", (balance, alignment), "must be >= 0")
        self.router, self.balance, self.alignment = router, float(balance), float(alignment)
        self.labels: Tensor | None = None
        self.last: dict[str, float] = {}

    def set_labels(self, labels: Tensor | Sequence[int] | None) -> None:
        """Expert index of each row's task ``(B,)`` (-100: unlabelled row; ``None``: no alignment term)."""
        labels = None if labels is None else torch.as_tensor(labels)
        require(labels is None or (labels.dim() == 1 and not labels.is_floating_point()), "labels",
                None if labels is None else tuple(labels.shape), "must be a 1-D integer tensor, one per row")
        self.labels = labels

    def forward_loss(self, model: nn.Module) -> Tensor | None:
        found = routers(model).get(self.router)
        if not isinstance(found, MixerRouter):
            raise LorakitError(f"SBL needs the mixer router {self.router!r}; this model's routers: "
                               f"{sorted(routers(model)) or 'none'} (build it with add_mixer / load_mixer)")
        records = found.pop_records()
        if not records:
            return None
        probs = [p for p, _ in records.values()]
        balance = torch.stack([switch_balance(p.reshape(-1, p.shape[-1]), k) for p, k in records.values()]).mean()
        terms, self.last = [self.balance * balance], {"balance": float(balance.detach())}
        if self.labels is not None:
            rows = probs[0].shape[0]
            if self.labels.shape != (rows,):
                raise LorakitError(f"SBL: {self.labels.numel()} labels for a batch of {rows} rows; set_labels each "
                                   f"batch's (rows,) task indices")
            mean = torch.stack([F.pad(p.reshape(rows, -1, p.shape[-1]).mean(1), (0, found.n - p.shape[-1]))
                                for p in probs]).mean(0)
            labels = self.labels.to(mean.device)
            if bool((labels != -100).any()):
                if bool(((labels != -100) & ((labels < 0) | (labels >= found.n))).any()):
                    raise LorakitError(f"SBL labels must be expert indices in [0, {found.n}) or -100")
                alignment = F.nll_loss(mean.clamp_min(1e-12).log(), labels, ignore_index=-100)
                terms.append(self.alignment * alignment)
                self.last["alignment"] = float(alignment.detach())
        return torch.stack(terms).sum()

    def metrics(self) -> dict[str, float]:
        return {f"sbl/{key}": value for key, value in self.last.items()}
