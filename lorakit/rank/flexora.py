"""Flexora (Wei et al., 2024; METHODS.md entry 30): choose which layers to fine-tune as a hyper-parameter
optimisation, then train only those.

During a search phase every layer ``l`` (a transformer block: the host paths up to their first numeric component,
e.g. ``model.layers.3``) computes ``W x + α_l delta(x)``: the scalar ``α_l`` (1 at start, so the model is plain LoRA)
weighs the adapter's contribution inside each host layer's forward -- a
:class:`~lorakit.routing.weighted.WeightedRouting` installed on the adapter's layers for the search, never a hook
around the adapter module, which the fused LoRA kernel bypasses (the scales then never received a gradient). During
the search only adapter ``name`` acts on its layers.
The adapter is trained on the training loss by the trainer; after each step the ``α`` take one Adam step on the
*validation* loss (``val_loss(model)``), the first-order approximation of the paper's unrolled differentiation
(DARTS first order: the LoRA weights are treated as constants of ``α``). At ``search_steps`` the ``keep`` layers
with the largest ``α`` stay; every other layer's adapter is removed from the model and the optimizer, and the
``α`` are dropped (the selected layers continue training from their current weights rather than being
re-initialised: assumed, the paper retrains them).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hooks import TrainingHook, optimized_parameters, replace_parameter
from ..hosts.host import HostLayer
from ..inject import hosts
from ..routing.weighted import WeightedRouting


def block_of(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``; a path without a number is its own block."""
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", path)
    return match.group(1) if match else path


class FlexoraHook(TrainingHook):
    """Learns per-layer scales on the validation loss for ``search_steps`` steps, then keeps the ``keep`` best
    layers' adapters and removes the rest."""

    def __init__(self, val_loss: Callable[[nn.Module], Tensor], *, search_steps: int, keep: int,
                 name: str = "default", alpha_lr: float = 0.05, layer_of: Callable[[str], str] = block_of) -> None:
        require(search_steps >= 1, "search_steps", search_steps, "must be >= 1")
        require(keep >= 1, "keep", keep, "must be >= 1 (layers to keep)")
        self.val_loss, self.search_steps, self.keep, self.name = val_loss, search_steps, keep, name
        self.alpha_lr, self.layer_of = alpha_lr, layer_of
        self.alphas: dict[str, nn.Parameter] = {}
        self.selected: list[str] | None = None
        self._previous: dict[HostLayer, Any] = {}  # each searched layer's routing before the search
        self._alpha_opt: torch.optim.Optimizer | None = None

    def _layers(self, model: nn.Module) -> dict[str, list[HostLayer]]:
        grouped: dict[str, list[HostLayer]] = {}
        for host in hosts(model):
            if self.name in host.adapters:
                grouped.setdefault(self.layer_of(host.path), []).append(host)
        if not grouped:
            raise LorakitError(f"Flexora: the model has no adapter named {self.name!r}")
        return grouped

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.selected is not None or self._previous:
            return
        layers = self._layers(model)
        require(self.keep <= len(layers), "keep", self.keep, f"must be at most the number of layers ({len(layers)})")
        device = next(iter(layers.values()))[0].backend.weight().device
        self.alphas = {layer: nn.Parameter(torch.ones((), device=device)) for layer in layers}
        scaled = WeightedRouting([self.name], lambda path, x: self.alphas[self.layer_of(path)].reshape(1), "dense")
        for layer_hosts in layers.values():
            for host in layer_hosts:
                self._previous[host], host.routing = host.routing, scaled
        self._alpha_opt = torch.optim.Adam(list(self.alphas.values()), lr=self.alpha_lr)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.selected is not None or self._alpha_opt is None:
            return
        if step <= self.search_steps:
            self._alpha_opt.zero_grad(set_to_none=True)
            trained = optimized_parameters(optimizer)
            grads = torch.autograd.grad(self.val_loss(model), list(self.alphas.values()))
            for alpha, grad in zip(self.alphas.values(), grads):
                alpha.grad = grad
            self._alpha_opt.step()
            for p in trained:  # the validation pass must not leak gradients into the next training step
                p.grad = None
        if step == self.search_steps:
            self.select(model, optimizer)

    @torch.no_grad()
    def select(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Keep the ``keep`` layers with the largest ``α``; remove the other layers' adapters; drop the scales."""
        ranked = sorted(self.alphas, key=lambda k: float(self.alphas[k]), reverse=True)
        self.selected = sorted(ranked[:self.keep])
        for layer, layer_hosts in self._layers(model).items():
            if layer in self.selected:
                continue
            for host in layer_hosts:
                for p in host.adapters[self.name].parameters():
                    if optimizer is not None and any(q is p for q in optimized_parameters(optimizer)):
                        replace_parameter(optimizer, p, None)
                    p.requires_grad_(False)
                host.remove(self.name)
        for host, routing in self._previous.items():
            host.routing = routing
        self._previous, self.alphas, self._alpha_opt = {}, {}, None
        return self.selected

    def state_dict(self) -> dict[str, Any]:
        return {"selected": self.selected}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if state.get("selected") is not None:
            raise LorakitError("Flexora cannot resume a run after its layer selection (the optimizer was built for "
                               f"all layers); the selected layers were {state['selected']}: restart with only those")
