"""MoSA, Mixture of Sparse Adapters (Zhang et al., 2023, "Split & Merge"; METHODS.md entry 16).

    A = sum_{i=1..m} A (.) M_i,   B = sum_{i=1..m} B (.) N_i          (M_i, N_i: disjoint masks covering A, B)
    training step:  delta(x) = s * (B (.) N_S)(A (.) M_S) x,   M_S = sum_{i in S} M_i,  S = the sampled modules
    after tuning:   delta(x) = s * B A x                        (the merged, complete adapter)

The adapter (either form, see below; the formulas above are written for the parallel form's ``A``, ``B``) is *split*
into ``modules`` non-overlapping sparse modules: every entry of its two weights belongs to exactly one module (a
balanced random partition from ``seed``, rebuilt on load). Each training step activates a random subset of the
modules (:func:`mosa_resample`, called before the forward), so only their entries receive gradients; the modules are
*merged* back by construction, since their sum is the full pair of weights: evaluation mode (and training before any
resample, or after :func:`mosa_resample` with ``k=None``) runs the complete adapter, at exactly the unsplit adapter's
cost.

Two forms (``MosaConfig.form``):

* ``"paper"`` (the default, :class:`MosaBottleneck`): the paper's serial bottleneck adapter after the host layer, on
  its output ``y = base(x)``::

      contribution = s * W_up act(W_down y),    W_down: (r, d_out) kaiming,  W_up: (d_out, r) zero (identity at init)
      training step:  s * (W_up (.) N_S) act((W_down (.) M_S) y)

  split into the same disjoint sparse modules over ``W_down``, ``W_up`` and sampled by the same hook; evaluation runs
  the complete (merged-modules) adapter. It is non-linear in ``x``: its capabilities declare ``mergeable=False``,
  ``factorable=False`` (the host refuses to merge it; LoRA export refuses it), linear layers only; no adapter biases,
  no dropout, ``init`` must be ``"kaiming"``.
* ``"parallel"`` (the mergeable variant, :class:`Mosa`): the adapter is a parallel linear bottleneck, i.e. LoRA's
  ``s B A`` with every LoRA option (init, rank/alpha patterns, dropout), mergeable and factorable, on every layer type
  LoRA supports. Ask for it to merge MoSA, read ``delta_weight`` / ``factors`` or export it as a plain LoRA.

``method="mosa"`` builds the paper's form. The registry holds :class:`Mosa`, whose class-level capabilities are the
parallel form's (its layer types are the union of both forms'); read a built adapter's ``capabilities``, never the
class's. Adapter files written before the ``form`` field existed were trained as the parallel form and load as such
(:attr:`MosaConfig.FILE_DEFAULTS`).

Hierarchical sparse strategy (``levels``; the abstract only says "a hierarchical sparse strategy to better leverage
limited training data" and leaves its definition open). Implemented here: nested granularities. Level ``l`` (``0 ..
levels-1``) groups the ``modules`` fine modules into ``g_l = modules / 2**l`` coarse modules (coarse module ``j`` is
the union of the fine modules ``i`` with ``i % g_l == j``), so every level partitions the adapter and each coarse
module is the union of two modules of the level below. Each step draws a level uniformly, then ``min(k, g_l)`` of
its coarse modules; ``levels=1`` is the plain strategy (and the previous random stream). Both forms accept it.
Sampled modules are not rescaled (the paper's description has no dropout-style rescaling).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import ConfigError, LorakitError, require
from ..hooks import TrainingHook, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..hosts.host import adapters_named
from .base import Adapter, Capabilities, register_method
from .lora import Lora, LoraConfig

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # the paper form's non-linearity


@dataclass(frozen=True)
class MosaConfig(LoraConfig):
    """Config of a MoSA adapter: :class:`LoraConfig`'s fields plus the split.

    Attributes:
        modules: number of non-overlapping sparse modules the adapter is split into.
        seed: seed of the partition of ``A`` and ``B`` into modules.
        active_modules: modules sampled for each training step (:func:`mosa_resample`); all are used in evaluation.
        form: ``"paper"`` (default; the paper's serial non-linear bottleneck on the layer output, not mergeable) or
            ``"parallel"`` (the mergeable LoRA-shaped update, taking every LoRA option).
        activation: the paper form's non-linearity, ``"relu"`` or ``"gelu"``.
        levels: granularities of the hierarchical sparse strategy (1: none); ``modules`` must divide by
            ``2**(levels-1)``.
    """

    #: The accepted values of ``form``.
    FORMS: ClassVar[tuple[str, ...]] = ("paper", "parallel")
    #: Values of fields that adapter files written before the field existed omit: such a file was trained as the
    #: parallel form (the only one then), so it loads as that, not as today's default.
    FILE_DEFAULTS: ClassVar[Mapping[str, Any]] = {"form": "parallel"}

    modules: int = 4
    seed: int = 0
    active_modules: int = 1
    form: str = "paper"
    activation: str = "relu"
    levels: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.modules, int) and self.modules >= 1, "modules", self.modules,
                "must be a positive integer")
        require(isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        require(isinstance(self.active_modules, int) and 1 <= self.active_modules <= self.modules, "active_modules",
                self.active_modules, f"must be an integer in [1, modules={self.modules}]")
        require(self.form in self.FORMS, "form", self.form, f"must be one of {self.FORMS}")
        require(self.activation in _ACTIVATIONS, "activation", self.activation,
                f"must be one of {sorted(_ACTIVATIONS)}")
        require(isinstance(self.levels, int) and self.levels >= 1 and self.modules % 2 ** (self.levels - 1) == 0,
                "levels", self.levels,
                f"must be a positive integer with modules={self.modules} divisible by 2**(levels-1)")
        if self.form == "paper":
            lora_only = "form='parallel' takes every LoRA option"
            require(self.dropout == 0, "dropout", self.dropout,
                    f"is not supported with form='paper' (the default); {lora_only}")
            require(not self.lora_bias, "lora_bias", True,
                    f"is not supported with form='paper' (the default); {lora_only}")
            require(self.init == "kaiming", "init", self.init,
                    f"must be 'kaiming' with form='paper' (the default; W_up starts at 0); {lora_only}")


def partition(shape: torch.Size, modules: int, gen: torch.Generator) -> Tensor:
    """A balanced random assignment of every entry of a ``shape`` tensor to one of ``modules`` modules."""
    return (torch.randperm(shape.numel(), generator=gen) % modules).view(shape)


def module_masks(active: Tensor | None, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor] | None:
    """The masks of the two weights' entries in the modules flagged by ``active: (modules,) bool`` (each entry's
    module index in ``first`` / ``second``); ``None``: every module."""
    if active is None:
        return None
    active = active.to(first.device)
    return active[first], active[second]


@register_method("mosa", MosaConfig)
class Mosa(Lora):
    """MoSA's parallel form: LoRA whose factors, in a training step after :func:`mosa_resample`, keep only the sampled
    modules' entries. Registered under ``"mosa"``; building it with ``form='paper'`` (the default) gives a
    :class:`MosaBottleneck`."""

    _masks: tuple[Tensor, Tensor] | None = None  # (mask of A, mask of B) of the sampled modules; None: all modules

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """The registry builds ``Mosa(geometry, config, base)``; ``form='paper'`` returns a :class:`MosaBottleneck`
        (not a :class:`Lora`, so nothing treats it as one). Without arguments (copy, pickle) a plain instance."""
        config = args[1] if len(args) > 1 else kwargs.get("config")
        if cls is Mosa and isinstance(config, MosaConfig) and config.form == "paper":
            return MosaBottleneck(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, geometry: Geometry, config: MosaConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        gen = torch.Generator().manual_seed(config.seed)
        a, b = self.a, self.b
        self.register_buffer("mosa_module_A", partition(a.shape, config.modules, gen).to(a.device), persistent=False)
        self.register_buffer("mosa_module_B", partition(b.shape, config.modules, gen).to(b.device), persistent=False)

    @property
    def a(self) -> Tensor:
        a = super().a
        return a * self._masks[0].to(a.dtype) if self._masks is not None and self.training else a

    @property
    def b(self) -> Tensor:
        b = super().b
        return b * self._masks[1].to(b.dtype) if self._masks is not None and self.training else b

    def sample(self, active: Tensor | None) -> None:
        """Keep only the modules flagged in ``active: (modules,) bool`` in training steps (``None``: all)."""
        self._masks = module_masks(active, self.mosa_module_A, self.mosa_module_B)

    @contextlib.contextmanager
    def complete(self) -> Iterator[None]:
        """Within the block the factors are the complete (merged) adapter's, whatever was sampled."""
        masks, self._masks = self._masks, None
        try:
            yield
        finally:
            self._masks = masks

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        with self.complete():
            return super().merge_delta(unit_scale)

    def factors(self) -> tuple[Tensor, Tensor]:
        with self.complete():
            return super().factors()

    @property
    def stochastic(self) -> bool:
        """In a training step after a resample the update is the sampled modules', not ``factors()``'s."""
        return super().stochastic or (self.training and self._masks is not None)


class MosaBottleneck(Adapter):
    """MoSA's paper form (the default): ``s * W_up act(W_down y)`` on the host output ``y``, its weights split into
    sparse modules."""

    capabilities = Capabilities(layers=frozenset({"linear"}), mergeable=False, factorable=False)
    _masks: tuple[Tensor, Tensor] | None = None  # (mask of W_down, mask of W_up) of the sampled modules; None: all

    def __init__(self, geometry: Geometry, config: MosaConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        if geometry.kind not in self.capabilities.layers:
            raise ConfigError(f"method 'mosa' with form='paper' (the default) does not support {geometry.kind} "
                              f"layers; it supports: {sorted(self.capabilities.layers)} (form='parallel' supports "
                              f"every layer type LoRA does)")
        r, d = config.r, geometry.d_out
        self.scale = config.scale
        self.act = _ACTIVATIONS[config.activation]
        self.mosa_down = nn.Parameter(torch.empty(r, d))
        self.mosa_up = nn.Parameter(torch.zeros(d, r))
        nn.init.kaiming_uniform_(self.mosa_down, a=math.sqrt(5))
        gen = torch.Generator().manual_seed(config.seed)
        self.register_buffer("mosa_module_down", partition(self.mosa_down.shape, config.modules, gen), persistent=False)
        self.register_buffer("mosa_module_up", partition(self.mosa_up.shape, config.modules, gen), persistent=False)
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(W_down, W_up)`` as the forward uses them: the sampled modules' entries in a training step."""
        down, up = self.mosa_down, self.mosa_up
        if self._masks is not None and self.training:
            down, up = down * self._masks[0].to(down.dtype), up * self._masks[1].to(up.dtype)
        return down, up

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        down, up = self.weights()
        h = self.act(F.linear(base_out.to(down.dtype), down))
        return (F.linear(h, up) * self.scale).to(base_out.dtype)

    def sample(self, active: Tensor | None) -> None:
        """Keep only the modules flagged in ``active: (modules,) bool`` in training steps (``None``: all)."""
        self._masks = module_masks(active, self.mosa_module_down, self.mosa_module_up)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        raise LorakitError("MoSA with form='paper' is a serial non-linear bottleneck adapter and cannot be merged "
                           "into the base weight; use form='parallel' for a mergeable MoSA")

    @property
    def stochastic(self) -> bool:
        return self.training and self._masks is not None

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"mosa_down": self.mosa_down, "mosa_up": self.mosa_up}

    def up_projections(self) -> dict[str, nn.Parameter]:
        return {"mosa_up": self.mosa_up}


def draw_modules(config: MosaConfig, k: int, generator: torch.Generator | None = None) -> Tensor:
    """The fine modules, ``(modules,) bool``, of one step's draw: a level (when ``levels > 1``), then ``min(k, g)`` of
    its ``g`` coarse modules, each the union of the fine modules ``i`` with ``i % g == j``."""
    m = config.modules
    g = m
    if config.levels > 1:
        g = m // 2 ** int(torch.randint(config.levels, (1,), generator=generator))
    coarse = torch.zeros(g, dtype=torch.bool)
    coarse[torch.randperm(g, generator=generator)[:min(k, g)]] = True
    return coarse[torch.arange(m) % g]


def mosa_resample(model: nn.Module, k: int | None = 1, generator: torch.Generator | None = None,
                  name: str = "default") -> None:
    """Activate ``k`` random modules (independently per layer) of MoSA adapter ``name`` for the next training step.

    ``k=None`` activates all of them again (the complete adapter).
    """
    for _, module in adapters_named(model, name, (Mosa, MosaBottleneck)):
        m = module.config.modules
        if k is None:
            module.sample(None)
            continue
        require(isinstance(k, int) and 1 <= k <= m, "k", k, f"must be an integer in [1, modules={m}]")
        module.sample(draw_modules(module.config, k, generator))


class MosaResample(TrainingHook):
    """Samples ``k`` modules per layer of adapter ``name`` before each step (seeded; the sampler's state is
    checkpointed); the complete adapter after the last step."""

    def __init__(self, name: str, k: int, steps: int, seed: int = 0) -> None:
        require(isinstance(k, int) and k >= 1, "k", k, "must be a positive integer")
        self.name, self.k, self.steps = name, k, steps
        self.generator = torch.Generator().manual_seed(seed)

    def before_forward(self, model: nn.Module, step: int) -> None:
        mosa_resample(model, self.k, self.generator, self.name)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step >= self.steps:
            mosa_resample(model, None, name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.generator.set_state(state["generator"])


@training_rule("mosa")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, MosaConfig)
    return [MosaResample(name, config.active_modules, steps, config.seed)]
