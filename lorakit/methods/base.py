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
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry, mix_units, per_unit
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
    #: A frozen adapter (a mixture's expert loaded from a file) stays in the forward but trains nothing:
    #: ``trainable_parameters`` leaves it out and its tensors do not require grad.
    frozen = False
    #: Runtime multiplier of the contribution, ``out = base(x) + multiplier * forward(...)``, set by
    #: ``lorakit.set_scale`` (scale schedules); every routing strategy applies it (:mod:`lorakit.routing.strategy`),
    #: methods never read it. Not saved: files hold the adapter as trained.
    multiplier: float = 1.0

    def __init__(self, geometry: Geometry, config: AdapterConfig, base: Backend) -> None:
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

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        """The contribution to add to ``base_out`` (the frozen layer's output for the same rows)."""
        raise NotImplementedError

    def fused_forward(self, x: Tensor, base: Backend) -> Tensor | None:
        """Optionally compute ``base(x) + forward(...)`` in one fused op; ``None`` means "not here"."""
        return None

    @property
    def reproducible_from_file(self) -> bool:
        """Whether its saved tensors plus the stock base (re-initialised on load) reproduce this adapter."""
        return True

    def attach(self, base: Backend) -> None:
        """Called once when the adapter joins its host layer: the place to rewrite the base (PiSSA's residual)."""

    @property
    def rewrites_base(self) -> bool:
        """Whether the next :meth:`attach` rewrites the base weight (a residual initialisation such as PiSSA's)."""
        return False

    def pending_compensation(self) -> tuple[Tensor, Tensor] | None:
        """The base rewrite this adapter will make when attached, ``W <- W - U D``, as canonical ``(U, D)`` (scale
        folded in); ``None`` when it leaves the base alone. With it, the adapter equals ``[B_eff, -U] [A_eff; D]``
        on the stock base (how an adapter pool serves a PiSSA / OLoRA adapter without touching the shared base)."""
        return None

    def merge_scale(self, base: Backend) -> Tensor | None:
        """Per-output-unit factor this adapter applies to the base weight when merged (``None``: 1).

        Merging maps ``W0 -> merge_scale * W0 + merge_delta(merge_scale)``; only weight-rescaling methods (DoRA)
        return a factor. The host caches it at merge time so unmerging is exact.
        """
        return None

    def merge_map(self, base: Backend) -> Tensor | None:
        """A ``(d_out, d_out)`` matrix ``L`` this adapter applies to the base weight's output units (``None``: ``I``).

        For methods whose update acts on ``W0`` through a non-diagonal map on the output side (``L W0 x``: Hydra's
        sequential branch ``I + B_s A_s``, TLoRA's transform ``T``): merging maps ``W0 -> L W0 + merge_delta``.
        Only Linear / Conv layers (output units are the weight's rows). ``L`` must depend on the adapter's tensors
        only, not on the base weight's values: the host rebuilds it on unmerge (nothing ``d_out x d_out`` is kept)
        and solves with it; it refuses to merge when unmerging could not restore the base (singular ``L``).
        """
        return None

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        """The additive part of the merged weight, in the canonical layout, given :meth:`merge_scale`'s value."""
        raise NotImplementedError

    def bias_delta(self) -> Tensor | None:
        """What merging adds to the base layer's bias (``None``: nothing)."""
        return None

    def delta_weight(self, base: Backend) -> Tensor:
        """The dense update ``W' - W0`` in the base weight's canonical layout (float32)."""
        unit_scale, unit_map = self.merge_scale(base), self.merge_map(base)
        delta = self.merge_delta(unit_scale).float()
        if unit_scale is None and unit_map is None:
            return delta
        w = base.weight().float()
        if unit_scale is not None:
            delta = delta + (per_unit(unit_scale, w) - 1) * w
        if unit_map is not None:
            eye = torch.eye(unit_map.shape[0], dtype=torch.float32, device=unit_map.device)
            delta = delta + mix_units(unit_map.float() - eye, w)  # (L - I) W0, exact where L = I
        return delta

    @property
    def stochastic(self) -> bool:
        """Whether the forward is random in the current mode (an active dropout, a sampled training mask): then the
        update is not exactly ``factors()`` for a given input, and the stacked / grouped products do not apply."""
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """``(B_eff, A_eff)`` with the scale folded in, when the update is exactly low rank."""
        return None

    def trainable(self) -> dict[str, nn.Parameter]:
        """The tensors this adapter trains, by their state-dict name."""
        raise NotImplementedError

    def up_projections(self) -> dict[str, nn.Parameter]:
        """The trained up-projection factors (``B``, the output side of a low-rank product), keyed as in
        :meth:`trainable`; LoRA+ trains them at a larger learning rate. Default: none."""
        return {}


def base_product(geometry: Geometry, base_out: Tensor, base: Backend) -> Tensor:
    """``W0 x`` recovered from the frozen layer's output ``W0 x + b`` (for methods that act on ``W0``)."""
    return base_out if base.bias is None else base_out - geometry.channel(base.bias)


def over_output_units(geometry: Geometry, y: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` (acting on the last axis) over the output units of a layer output ``y`` (channels on conv)."""
    if geometry.kind != "conv":
        return fn(y)
    return fn(y.movedim(1, -1)).movedim(-1, 1)


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
