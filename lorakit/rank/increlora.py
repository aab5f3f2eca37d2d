"""IncreLoRA (Zhang et al., 2023, arXiv 2308.12043; METHODS.md entry 29): start with small ranks and add rank
components to the most important layers during training, within a total budget, on the gated ``P Λ Q`` adapter.

Each adapted layer holds ``ΔW = s · P Λ Q = s · Σ_i λ_i P_{:,i} Q_{i,:}`` (:mod:`lorakit.methods.gated`), so a rank
is added by appending one triplet ``(P_{:,i}, λ_i, Q_{i,:})``. Importance is AdaLoRA's smoothed sensitivity
(:mod:`lorakit.rank.importance`), averaged over a layer's counted components::

    I(w) = |w ⊙ ∇w|,   Ī ← β1 Ī + (1-β1) I,   Ū ← β2 Ū + (1-β2) |I - Ī|,   s(w) = Ī ⊙ Ū
    S_i = s(λ_i) + mean_j s(P_{j,i}) + mean_j s(Q_{i,j}),   S_layer = mean over counted i of S_i

After step ``t`` (completed steps) with ``t > init_warmup`` and ``t % grow_every == 0`` the ``grow_layers`` layers
with the highest ``S_layer`` each gain one component, as long as the total counted rank stays within ``budget``:
no rank is added at or before ``init_warmup`` (the authors' initial warm-up).

**Advance learning** (``advance_learning=True``, the authors' default): every layer holds one *reserve* component
after its counted ones. A reserve's ``P_{:,i}, Q_{i,:} ~ N(0, 0.02²)`` train from the start while its ``λ_i`` is
held at ``1e-5``: its gradient is zeroed where it is produced (a tensor hook on ``lora_E``, so gradient clipping,
the importance scores and the optimizer all see zero, as with the authors' ``requires_grad=False``; AdamW's moments
of it stay zero) and its value is put back after every step (so weight decay cannot shrink it). The reserve barely
changes the output, yet its factors receive Adam-normalised gradients: they are learned in advance. When a layer
grows, its reserve becomes an ordinary component (its ``λ`` trains from ``1e-5`` on, its learned ``P, Q`` and
their moments are kept) and a fresh reserve is appended. Reserves never count against the budget. When the counted
total reaches the budget the reserves are removed (tensors, optimizer state, importance rows): the same ``ΔW`` as
the authors' setting their ``λ`` to 0, and an adapter whose ranks are exactly the budget. Without advance learning
a new component starts with ``λ = 0`` and ``P, Q ~ N(0, 0.02²)`` (the output does not change at the step it is
added), and its moments start at zero.

Ranks and reporting: the adapter's tensors hold every component the forward pass uses, reserves included, so
:func:`~lorakit.rank.ops.ranks_of` / :func:`~lorakit.rank.ops.total_rank`, the recorded ``rank_pattern`` and every
file saved mid-training (which loads and gives the same output) count them. The budget, the growth and the logged
``increlora/<name>/rank`` use :meth:`IncreLoraHook.counted_ranks`, which leaves them out; ``increlora/<name>/reserve``
logs how many there are. Checkpoints carry the number of reserves, so a resumed run continues exactly.

Faithful to the authors' code (github.com/FeiyuZhang98/IncreLoRA, ``loralib/increlora.py``): the initial warm-up,
advance learning with reserves at ``λ = 1e-5`` outside the budget, promoted on growth with their learned factors,
their contribution removed at the target. Assumed or different, where the paper is vague or lorakit's gated adapter
differs: one rank (so one reserve) per chosen layer per growth step (the authors add ``target_r / 2``); the layer
score above (the authors score ``|ΔW ⊙ ∇ΔW|`` of the whole update); the scale ``s`` stays fixed (theirs is
``alpha / current rank``); a promoted ``λ`` continues its tensor's Adam step count; the orthogonality regulariser
acts on the whole ``P`` and ``Q``, reserves included (theirs on each component alone); the paper's "restart warmup"
of the learning rate for new components is not implemented.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..config import AdapterConfig
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..hosts.host import HostLayer
from ..methods.adalora import IncreLoraConfig
from .importance import ImportanceHook
from .ops import gated_layers, resize_ranks

RESERVE_LAMBDA = 1e-5  # λ of a reserve component (the authors' value)


class IncreLoraHook(ImportanceHook):
    """Importance-driven rank growth within ``budget`` (the total counted rank over all layers; ``per_layer``: per
    layer on average), after an ``init_warmup`` of steps without growth, with or without advance learning."""

    def __init__(self, name: str = "default", *, budget: int, per_layer: bool = False, grow_every: int = 10,
                 grow_layers: int = 1, beta1: float = 0.85, beta2: float = 0.85, orth_reg: float = 0.5,
                 init_warmup: int = 0, advance_learning: bool = True) -> None:
        require(budget >= 1, "budget", budget, "must be >= 1 (total rank over all layers)")
        require(grow_every >= 1, "grow_every", grow_every, "must be >= 1")
        require(grow_layers >= 1, "grow_layers", grow_layers, "must be >= 1")
        require(orth_reg >= 0, "orth_reg", orth_reg, "must be >= 0")
        require(init_warmup >= 0, "init_warmup", init_warmup, "must be >= 0 (steps without growth)")
        super().__init__(name, beta1, beta2, orth_reg)
        self.budget_given, self.per_layer, self.budget = budget, per_layer, budget
        self.grow_every, self.grow_layers = grow_every, grow_layers
        self.init_warmup, self.advance_learning = init_warmup, advance_learning
        self.reserve = 0  # reserve components at the end of every layer (1 while advance learning, before the target)
        self._guards: list[RemovableHandle] = []

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().on_train_begin(model, optimizer)
        layers = gated_layers(model, self.name)
        self.budget = self.budget_given * len(layers) if self.per_layer else self.budget_given
        start = sum(self.counted_ranks(model).values())
        require(start <= self.budget, "budget", self.budget, f"must be at least the starting total rank {start}")
        if self.advance_learning and not self.reserve and start < self.budget:
            self._add_reserves(model, optimizer)
        self._guard(model)

    def counted_ranks(self, model: nn.Module) -> dict[str, int]:
        """Layer path -> rank without the reserve: what the budget counts."""
        return {host.path: adapter.r - self.reserve for host, adapter in gated_layers(model, self.name)}

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.reserve:
            for _, adapter in gated_layers(model, self.name):
                adapter.lora_E[-self.reserve:] = RESERVE_LAMBDA  # undo weight decay (its gradient is always zero)
        if step > self.init_warmup and step % self.grow_every == 0:
            self.grow(model, optimizer)

    @torch.no_grad()
    def grow(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Add one counted rank to each of the top-scoring layers that the budget allows (their reserve, learned
        in advance, when there is one); returns their paths. Removes the reserves once the budget is reached."""
        counted = self.counted_ranks(model)
        room = self.budget - sum(counted.values())
        layers = gated_layers(model, self.name)
        if room <= 0 or not layers:
            return []
        zero = torch.zeros(())
        score = torch.stack([self.importance.scores(h.path, a)[:counted[h.path]].mean().cpu() if counted[h.path]
                             else zero for h, a in layers])
        chosen = torch.topk(score, min(self.grow_layers, room, len(layers))).indices.tolist()
        for i in chosen:
            host, adapter = layers[i]
            self._resize(model, host, torch.arange(adapter.r), 1, optimizer)
            if self.reserve:  # the old reserve now counts; the new last component is the next reserve
                adapter.lora_E[-1] = RESERVE_LAMBDA
        if self.reserve and room == len(chosen):
            self._drop_reserves(model, optimizer)
        self._guard(model)
        return [layers[i][0].path for i in chosen]

    def _resize(self, model: nn.Module, host: HostLayer, keep: Tensor, extra: int,
                optimizer: torch.optim.Optimizer | None) -> None:
        resize_ranks(model, self.name, host, keep, extra=extra, optimizer=optimizer)
        self.importance.resize(host.path, keep, extra)

    @torch.no_grad()
    def _add_reserves(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        for host, adapter in gated_layers(model, self.name):
            self._resize(model, host, torch.arange(adapter.r), 1, optimizer)
            adapter.lora_E[-1] = RESERVE_LAMBDA
        self.reserve = 1

    def _drop_reserves(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        for host, adapter in gated_layers(model, self.name):
            self._resize(model, host, torch.arange(adapter.r - self.reserve), 0, optimizer)
        self.reserve = 0

    def _guard(self, model: nn.Module) -> None:
        """(Re)attach the hooks that zero the reserves' ``λ`` gradients to the current ``lora_E`` tensors."""
        for handle in self._guards:
            handle.remove()
        self._guards = [adapter.lora_E.register_hook(self._without_reserve)
                        for _, adapter in gated_layers(model, self.name)
                        if self.reserve and adapter.lora_E.requires_grad]

    def _without_reserve(self, grad: Tensor) -> Tensor:
        if not self.reserve:
            return grad
        grad = grad.clone()
        grad[-self.reserve:] = 0
        return grad

    def metrics(self) -> dict[str, float]:
        if self._model is None:
            return {}
        counted = self.counted_ranks(self._model)
        return {f"increlora/{self.name}/rank": float(sum(counted.values())),
                f"increlora/{self.name}/reserve": float(self.reserve * len(counted))}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "importance": self.importance.state_dict(), "reserve": self.reserve}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        self.importance.load_state_dict(state["importance"])
        self.reserve = int(state.get("reserve", 0))  # checkpoints written before advance learning hold none


@training_rule("increlora")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, IncreLoraConfig)
    return [IncreLoraHook(name, budget=config.target_r, per_layer=True, grow_every=config.grow_every,
                          grow_layers=config.grow_layers, beta1=config.beta1, beta2=config.beta2,
                          orth_reg=config.orth_reg, init_warmup=config.init_warmup,
                          advance_learning=config.advance_learning)]
