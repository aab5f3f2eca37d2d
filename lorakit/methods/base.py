"""The method protocol every adapter implements, and the method registry.

A method is one small file: a frozen config (subclass of :class:`~lorakit.config.AdapterConfig`), an
:class:`Adapter` subclass, and ``@register_method(name, ConfigClass)``. Merge, IO, routing and analysis are
written once against this protocol and never test for a method by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError
from ..hosts.backend import DenseBackend
from ..hosts.geometry import Geometry, per_unit
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


class SharedState(nn.Module):
    """Tensors one adapter shares across all its layers (random bases, shard pools, globally shared factors).

    Built once per model and adapter name by :meth:`Adapter.shared_state`, registered on the model under
    ``lorakit_shared.<adapter name>`` (so ``model.to`` moves it and files hold it once) and handed to each layer's
    adapter, which keeps a reference without registering it as its own submodule.
    """

    def trainable(self) -> dict[str, nn.Parameter]:
        """The shared tensors that are trained (default: every parameter; frozen bases are buffers)."""
        return dict(self.named_parameters())


class Adapter(nn.Module):
    """One named adapter on one host layer.

    Subclasses implement :meth:`forward`, :meth:`delta_weight` and :meth:`trainable`; the defaults for
    merging add and subtract :meth:`delta_weight`. Methods with state shared across layers override
    :meth:`shared_state` and take the result as the ``shared`` keyword of their constructor.
    """

    capabilities = Capabilities()

    def __init__(self, geometry: Geometry, config: AdapterConfig, base: DenseBackend) -> None:
        super().__init__()
        self.geometry = geometry
        self.config = config

    @classmethod
    def shared_state(cls, config: AdapterConfig, geometries: list[Geometry]) -> SharedState | None:
        """State shared by every layer of one adapter, built once from all targeted layers' geometries."""
        return None

    @property
    def shared(self) -> SharedState:
        """The adapter's :class:`SharedState` (set by :meth:`hold_shared`)."""
        return self.__dict__["_shared"]

    def hold_shared(self, shared: SharedState) -> None:
        """Keep a reference to ``shared`` without making it a submodule (its tensors are not this layer's)."""
        self.__dict__["_shared"] = shared

    def forward(self, x: Tensor, base_out: Tensor, base: DenseBackend) -> Tensor:
        """The contribution to add to ``base_out`` (the frozen layer's output for the same rows)."""
        raise NotImplementedError

    def fused_forward(self, x: Tensor, base: DenseBackend) -> Tensor | None:
        """Optionally compute ``base(x) + forward(...)`` in one fused op; ``None`` means "not here"."""
        return None

    @property
    def reproducible_from_file(self) -> bool:
        """Whether its saved tensors plus the stock base (re-initialised on load) reproduce this adapter."""
        return True

    def attach(self, base: DenseBackend) -> None:
        """Called once when the adapter joins its host layer: the place to rewrite the base (PiSSA's residual)."""

    def merge_scale(self, base: DenseBackend) -> Tensor | None:
        """Per-output-unit factor this adapter applies to the base weight when merged (``None``: 1).

        Merging maps ``W0 -> merge_scale * W0 + merge_delta(merge_scale)``; only weight-rescaling methods (DoRA)
        return a factor. The host caches it at merge time so unmerging is exact.
        """
        return None

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        """The additive part of the merged weight, in the canonical layout, given :meth:`merge_scale`'s value."""
        raise NotImplementedError

    def bias_delta(self) -> Tensor | None:
        """What merging adds to the base layer's bias (``None``: nothing)."""
        return None

    def delta_weight(self, base: DenseBackend) -> Tensor:
        """The dense update ``W' - W0`` in the base weight's canonical layout (float32)."""
        unit_scale = self.merge_scale(base)
        delta = self.merge_delta(unit_scale).float()
        if unit_scale is None:
            return delta
        w = base.weight().float()
        return (per_unit(unit_scale, w) - 1) * w + delta

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """``(B_eff, A_eff)`` with the scale folded in, when the update is exactly low rank."""
        return None

    def trainable(self) -> dict[str, nn.Parameter]:
        """The tensors this adapter trains, by their state-dict name."""
        raise NotImplementedError


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
