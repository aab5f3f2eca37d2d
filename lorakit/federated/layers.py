"""A model's adapter seen layer by layer, as the aggregators see it: tensors by *role* per layer path.

Roles follow PEFT's tensor names: ``A`` (``lora_A``: ``(r, d_in)``), ``B`` (``lora_B``: ``(d_out, r)``), ``R``
(``lora_R``: LoRA-XS / LoRA-SB's ``(r, r)`` core); any other tensor of an adapter (a DoRA magnitude, ...) keeps its
own state-dict key as its role, which only element-wise aggregators (FedAvg) handle. What a client uploads is its
adapter's *trainable* roles (:meth:`Adapter.trainable`), so the protocol, not the method's name, decides the traffic.

On the wire (Flower ``ArrayRecord``) a layer's role is the key ``"<layer path>|<role>"``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..hosts.host import adapters_named

ROLE_OF_KEY = {"lora_A.weight": "A", "lora_A": "A", "lora_B.weight": "B", "lora_B": "B", "lora_R": "R"}
SEPARATOR = "|"
Layers = dict[str, dict[str, Tensor]]  # layer path -> role -> tensor


def _role(key: str) -> str:
    return ROLE_OF_KEY.get(key, key)


def _adapters(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    found = [(host.path, adapter) for host, adapter in adapters_named(model, name)]
    if not found:
        raise LorakitError(f"the model has no adapter named {name!r} to federate")
    return found


def layer_tensors(model: nn.Module, name: str) -> Layers:
    """Every tensor of adapter ``name`` (detached copies), by layer path and role."""
    return {path: {_role(k): v.detach().clone() for k, v in adapter.state_dict().items()}
            for path, adapter in _adapters(model, name)}


def trained_tensors(model: nn.Module, name: str) -> Layers:
    """The trainable tensors of adapter ``name`` (what a client uploads; detached copies)."""
    return {path: {_role(k): v.detach().clone() for k, v in adapter.trainable().items()}
            for path, adapter in _adapters(model, name)}


def scales(model: nn.Module, name: str) -> dict[str, float]:
    """Each layer's update scale ``s`` (``alpha / r``); 1.0 for a method that has none."""
    return {path: float(getattr(adapter, "scale", 1.0)) for path, adapter in _adapters(model, name)}


@torch.no_grad()
def load_tensors(model: nn.Module, name: str, layers: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Copy ``layers`` into adapter ``name``'s live tensors (shape-checked); layers or roles not given stay."""
    adapters = dict(_adapters(model, name))
    for path, roles in layers.items():
        if path not in adapters:
            raise LorakitError(f"layer {path!r} has no adapter {name!r}; adapted layers: {sorted(adapters)[:5]}...")
        live = {_role(k): v for k, v in adapters[path].state_dict(keep_vars=True).items()}
        for role, value in roles.items():
            if role not in live:
                raise LorakitError(f"layer {path!r}: adapter {name!r} has no tensor {role!r} (it has {sorted(live)})")
            if tuple(value.shape) != tuple(live[role].shape):
                raise LorakitError(f"layer {path!r} tensor {role!r}: shape {tuple(value.shape)} does not fit the "
                                   f"adapter's {tuple(live[role].shape)}")
            live[role].copy_(value.to(live[role].dtype))


@torch.no_grad()
def add_to_base(model: nn.Module, name: str, updates: Mapping[str, tuple[Tensor, Tensor]],
                originals: Mapping[str, Tensor]) -> None:
    """Set each layer's frozen weight to ``original + up @ down`` (FLoRA's merge; ``originals``: the weights before
    any merge, canonical layout, from :func:`base_weights`)."""
    hosts = {host.path: host for host, _ in adapters_named(model, name)}
    for path, (up, down) in updates.items():
        backend = hosts[path].backend
        if not backend.supports_merge:
            raise LorakitError(f"layer {path!r}: its base ({type(backend).__name__}) cannot take a merged update; "
                               "FLoRA needs a dense base")
        original = originals[path]
        backend.set_weight(original + (up.float() @ down.float()).reshape(original.shape).to(original.device))


def base_weights(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Copies of the frozen weights of the layers adapter ``name`` adapts (canonical layout, float32)."""
    return {host.path: host.backend.weight().detach().float().clone() for host, _ in adapters_named(model, name)}


def flatten(layers: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``{"path|role": tensor}`` for the wire."""
    return {f"{path}{SEPARATOR}{role}": t for path, roles in layers.items() for role, t in roles.items()}


def unflatten(flat: Mapping[str, Tensor]) -> Layers:
    """The inverse of :func:`flatten`; a key without the separator is refused."""
    layers: Layers = {}
    for key, tensor in flat.items():
        path, sep, role = key.rpartition(SEPARATOR)
        if not sep or not path or not role:
            raise LorakitError(f"tensor key {key!r} is not '<layer path>{SEPARATOR}<role>'")
        layers.setdefault(path, {})[role] = tensor
    return layers


def nbytes(layers: Mapping[str, Mapping[str, Tensor]]) -> int:
    """Bytes of every tensor in ``layers``."""
    return sum(t.numel() * t.element_size() for roles in layers.values() for t in roles.values())
