"""The method protocol every adapter implements, and the method registry.

A method is one small file: a frozen config (subclass of :class:`~lorakit.config.AdapterConfig`), an
:class:`Adapter` subclass, and ``@register_method(name, ConfigClass)``. Merge, IO, routing and analysis are
written once against this protocol and never test for a method by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError
from ..hosts.backend import DenseBackend
from ..hosts.geometry import Geometry
from ..registry import Registry


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; merge, serving and IO consult this, never the method's name.

    Attributes:
        layers: geometry kinds the method supports ("linear", "conv", "embedding").
        mergeable: the update can be folded into the base weight.
        factorable: the update is exactly ``B_eff @ A_eff`` (stacked serving path, PEFT LoRA export).
        identity_at_init: the adapted model equals the base model right after ``adapt``.
    """

    layers: frozenset[str] = frozenset({"linear", "conv", "embedding"})
    mergeable: bool = True
    factorable: bool = False
    identity_at_init: bool = True


class Adapter(nn.Module):
    """One named adapter on one host layer.

    Subclasses implement :meth:`forward`, :meth:`delta_weight` and :meth:`trainable`; the defaults for
    merging add and subtract :meth:`delta_weight`.
    """

    capabilities = Capabilities()

    def __init__(self, geometry: Geometry, config: AdapterConfig, base: DenseBackend) -> None:
        super().__init__()
        self.geometry = geometry
        self.config = config

    def forward(self, x: Tensor, base_out: Tensor, base: DenseBackend) -> Tensor:
        """The contribution to add to ``base_out`` (the frozen layer's output for the same rows)."""
        raise NotImplementedError

    def fused_forward(self, x: Tensor, base: DenseBackend) -> Tensor | None:
        """Optionally compute ``base(x) + forward(...)`` in one fused op; ``None`` means "not here"."""
        return None

    def delta_weight(self, base: DenseBackend) -> Tensor:
        """The dense update in the base weight's canonical layout."""
        raise NotImplementedError

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """``(B_eff, A_eff)`` with the scale folded in, when the update is exactly low rank."""
        return None

    def trainable(self) -> dict[str, nn.Parameter]:
        """The tensors this adapter trains, by their state-dict name."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_into(self, base: DenseBackend) -> None:
        w = base.weight()
        base.set_weight(w.float() + self.delta_weight(base).float())

    @torch.no_grad()
    def unmerge_from(self, base: DenseBackend) -> None:
        w = base.weight()
        base.set_weight(w.float() - self.delta_weight(base).float())


MethodEntry = tuple[type[Adapter], type[AdapterConfig]]
METHODS: Registry[MethodEntry] = Registry("method")


def register_method(name: str, config_cls: type[AdapterConfig]) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: register ``cls`` under ``name`` with its config class."""

    def wrap(cls: type[Adapter]) -> type[Adapter]:
        if "method" in config_cls.__dict__ and config_cls.method not in ("", name):
            raise LorakitError(f"{config_cls.__name__} is already the config of method {config_cls.method!r}")
        config_cls.method = name  # type: ignore[misc]
        METHODS.register(name, (cls, config_cls))
        return cls

    return wrap


def build_config(method: str, **fields: Any) -> AdapterConfig:
    """``build_config("lora", r=8)`` -> ``LoraConfig(r=8)``; unknown methods list the available ones."""
    _, config_cls = METHODS.get(method)
    return config_cls(**fields)
