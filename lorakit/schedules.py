"""Schedules as training hooks: an adapter's strength and the learning rate per step, and staged layer ranges.

:class:`AdapterSchedule` sets, before each step ``t``, the runtime multiplier of named adapters' contributions
(:func:`lorakit.set_scale`: ``out = base(x) + s(t) * delta(x)``, honoured by every method and routing) and/or each
optimizer parameter group's learning rate ``lr_g(t) = lr_g * f(t)``, from a :class:`Schedule` of the step:

* :class:`Constant` ``v``;
* :class:`LinearWarmup` from ``start`` to ``end`` over ``steps`` steps, then ``end``;
* :class:`Cosine` ``end + (start - end) (1 + cos(pi p)) / 2`` with ``p = (t - warmup) / (steps - warmup)`` (clamped
  to [0, 1]), after an optional linear warm-up from 0 to ``start`` over ``warmup`` steps;
* :class:`Cyclical` (triangular; LoLA-SpecViT's cyclical scheduler, Smith's CLR):
  ``low + (high - low) (1 - |2 ((t mod period) / period) - 1|)``: ``low`` at the start of each period, ``high`` in
  its middle.

:class:`StagedLayers` (HiVG's hierarchical LoRA) trains an adapter stage by stage over layer ranges: from each stage's
first step only the adapter's tensors in that stage's layers train; the others keep contributing to the forward
(frozen at their current values, or still training with ``earlier="trained"`` for the earlier stages).

Both keep their state in ``state_dict`` / ``load_state_dict`` so a resumed run continues exactly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .config import check_regex
from .errors import ConfigError, LorakitError, require
from .hooks import TrainingHook
from .hosts.host import HostLayer, adapters_named
from .inject import set_scale
from .optim.lisa import find_blocks


class Schedule:
    """A value per completed optimizer step: ``schedule(step) -> float``."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


def _number(field: str, value: Any) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), field, value,
            "must be a finite number")


def _steps(field: str, value: Any, minimum: int = 1) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, field, value,
            f"must be an integer >= {minimum}")


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step."""

    value: float = 1.0

    def __post_init__(self) -> None:
        _number("value", self.value)

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """``start + (end - start) min(t, steps) / steps``: a linear ramp over ``steps`` steps, then ``end``."""

    steps: int
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        _steps("steps", self.steps)
        _number("start", self.start)
        _number("end", self.end)

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step, self.steps) / self.steps


@dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine decay from ``start`` to ``end`` reached at step ``steps`` (then kept), after an optional linear warm-up
    from 0 to ``start`` over the first ``warmup`` steps."""

    steps: int
    start: float = 1.0
    end: float = 0.0
    warmup: int = 0

    def __post_init__(self) -> None:
        _steps("steps", self.steps)
        _number("start", self.start)
        _number("end", self.end)
        _steps("warmup", self.warmup, minimum=0)
        require(self.warmup < self.steps, "warmup", self.warmup, f"must be less than steps ({self.steps})")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start * step / self.warmup
        progress = min(1.0, (step - self.warmup) / (self.steps - self.warmup))
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Cyclical(Schedule):
    """Triangular cycles: ``low`` at steps ``0, period, 2 period, ...``, ``high`` half-way through each period."""

    period: int
    low: float
    high: float

    def __post_init__(self) -> None:
        _steps("period", self.period, minimum=2)
        _number("low", self.low)
        _number("high", self.high)

    def __call__(self, step: int) -> float:
        phase = (step % self.period) / self.period
        return self.low + (self.high - self.low) * (1.0 - abs(2.0 * phase - 1.0))


def _check_schedule(field: str, value: Any) -> None:
    require(value is None or isinstance(value, Schedule), field, value,
            "must be a Schedule (Constant, LinearWarmup, Cosine, Cyclical) or None")


class AdapterSchedule(TrainingHook):
    """Before each step ``t``: adapters ``names`` run at scale ``scale(t)`` and each parameter group's learning rate is
    its initial one times ``lr(t)``.

    The scale is set before the forward (``before_forward``) and stays set after training: evaluate at full strength
    with ``lorakit.set_scale(model, names, 1.0)``. The learning rate is set just before ``optimizer.step()``
    (``before_step``), so it overrides a learning-rate scheduler stepped in the same loop; each group's initial rate is
    read once (``initial_lr`` when a scheduler recorded it, else ``lr``) and kept in the state.

    Args:
        scale: the adapters' scale per step (``None``: leave it).
        lr: the factor on each group's initial learning rate per step (``None``: leave the rates).
        names: the adapter(s) the scale applies to.
    """

    def __init__(self, scale: Schedule | None = None, lr: Schedule | None = None,
                 names: str | Sequence[str] = "default") -> None:
        _check_schedule("scale", scale)
        _check_schedule("lr", lr)
        require(scale is not None or lr is not None, "scale", scale, "or lr must be given")
        self.names = (names,) if isinstance(names, str) else tuple(names)
        require(len(self.names) > 0 and all(isinstance(n, str) for n in self.names), "names", names,
                "must be one or more adapter names")
        self.scale, self.lr = scale, lr
        self.step = -1  # the last step a value was set for
        self.base_lrs: list[float] | None = None

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.lr is None:
            return
        if self.base_lrs is None:
            self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        elif len(self.base_lrs) != len(optimizer.param_groups):
            raise LorakitError(f"AdapterSchedule: the checkpoint holds {len(self.base_lrs)} learning rates but the "
                               f"optimizer has {len(optimizer.param_groups)} parameter groups")

    def before_forward(self, model: nn.Module, step: int) -> None:
        self.step = step
        if self.scale is not None:
            set_scale(model, self.names, self.scale(step))

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.lr is None:
            return
        if self.base_lrs is None:
            raise LorakitError("AdapterSchedule: call on_train_begin(model, optimizer) before the first step")
        factor = self.lr(step)
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def metrics(self) -> dict[str, float]:
        if self.step < 0:
            return {}
        out = {} if self.scale is None else {"schedule/scale": self.scale(self.step)}
        return out if self.lr is None else {**out, "schedule/lr_factor": self.lr(self.step)}

    def _described(self) -> dict[str, str]:
        return {"scale": repr(self.scale), "lr": repr(self.lr), "names": repr(self.names)}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "base_lrs": self.base_lrs, **self._described()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        saved = {k: state.get(k) for k in self._described()}
        if saved != self._described():
            raise LorakitError(f"AdapterSchedule: the checkpoint was written with {saved}, this run has "
                               f"{self._described()}; resume with the same schedules")
        self.step = int(state["step"])
        self.base_lrs = None if state["base_lrs"] is None else [float(v) for v in state["base_lrs"]]


Layers = range | tuple[int, int] | str
EARLIER = ("frozen", "trained")


class StagedLayers(TrainingHook):
    """Train adapter ``name`` over layer ranges in stages (HiVG's hierarchical LoRA).

    Args:
        stages: ``[(start_step, layers), ...]`` with strictly increasing start steps, the first 0. ``layers`` is a
            ``range`` or a half-open ``(first, stop)`` pair of indices into the model's repeated blocks, or a regular
            expression matching whole host-layer paths (``r".*layers\\.[0-3]\\..*"``).
        name: the adapter trained in stages. Its layers that no stage names are left alone (they train throughout).
        blocks: module path of the ``nn.ModuleList`` of blocks that ranges index (default: the longest list of
            same-type modules, as LISA finds it).
        earlier: what the layers of finished stages do: ``"frozen"`` (stay in the forward, no longer trained: HiVG's
            rule) or ``"trained"`` (keep training with the current stage). Layers of later stages wait frozen (with
            an identity-at-init method they contribute nothing until their stage).

    A frozen tensor gets ``requires_grad=False``, loses its gradient and its optimizer state (it stays in the
    optimizer's parameter groups, which skip tensors without a gradient), so gradients reach only the current stage.
    """

    def __init__(self, stages: Sequence[tuple[int, Layers]], name: str = "default", blocks: str | None = None,
                 earlier: str = "frozen") -> None:
        require(isinstance(stages, (list, tuple)) and len(stages) > 0, "stages", stages,
                "must be a non-empty list of (start_step, layers)")
        starts = []
        for stage in stages:
            require(isinstance(stage, (list, tuple)) and len(stage) == 2, "stages", stage,
                    "each stage must be a (start_step, layers) pair")
            _steps("stage start", stage[0], minimum=0)
            _check_layers(stage[1])
            starts.append(stage[0])
        require(starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])), "stages", starts,
                "start steps must increase strictly from 0")
        require(earlier in EARLIER, "earlier", earlier, f"must be one of {EARLIER}")
        self.stages = [(int(s), layers) for s, layers in stages]
        self.name, self.blocks, self.earlier = name, blocks, earlier
        self.stage = -1  # the stage applied last
        self._tensors: list[list[Tensor]] = []  # per stage: the adapter's trained tensors in its layers
        self._optimizer: torch.optim.Optimizer | None = None

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        layers = adapters_named(model, self.name)
        if not layers:
            raise ConfigError(f"StagedLayers: the model has no adapter named {self.name!r}")
        self._tensors = []
        for start, selection in self.stages:
            chosen = self._select(model, [h for h, _ in layers], selection)
            if not chosen:
                raise ConfigError(f"StagedLayers: the stage from step {start} ({selection!r}) selects no layer of "
                                  f"adapter {self.name!r}")
            self._tensors.append([p for h in chosen for p in h.adapters[self.name].trainable().values()])
        self._optimizer = optimizer
        if self.stage >= 0:
            self._apply()  # resumed: the saved stage

    def _select(self, model: nn.Module, layers: list[HostLayer], selection: Layers) -> list[HostLayer]:
        if isinstance(selection, str):
            return [h for h in layers if re.fullmatch(selection, h.path)]
        first, stop = (selection.start, selection.stop) if isinstance(selection, range) else selection
        blocks = find_blocks(model, self.blocks)
        require(0 <= first < stop <= len(blocks), "layers", selection,
                f"must lie within the {len(blocks)} blocks of the model")
        inside = {id(m) for block in list(blocks)[first:stop] for m in block.modules()}
        return [h for h in layers if id(h) in inside]

    def current(self, step: int) -> int:
        """The index of the stage that step ``step`` belongs to."""
        return max(i for i, (start, _) in enumerate(self.stages) if start <= step)

    def before_forward(self, model: nn.Module, step: int) -> None:
        if self._optimizer is None:
            raise LorakitError("StagedLayers: call on_train_begin(model, optimizer) before the first step")
        stage = self.current(step)
        if stage != self.stage:
            self.stage = stage
            self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        live = range(self.stage + 1) if self.earlier == "trained" else (self.stage,)
        trained = {id(p) for i in live for p in self._tensors[i]}
        for tensors in self._tensors:
            for p in tensors:
                p.requires_grad_(id(p) in trained)
                if id(p) not in trained:
                    p.grad = None
                    self._optimizer.state.pop(p, None)  # type: ignore[union-attr]

    def metrics(self) -> dict[str, float]:
        return {} if self.stage < 0 else {"staged/stage": float(self.stage)}

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        stage = int(state["stage"])
        if not -1 <= stage < len(self.stages):
            raise LorakitError(f"StagedLayers: the checkpoint is at stage {stage} but this run has "
                               f"{len(self.stages)} stages; resume with the same stages")
        self.stage = stage


def _check_layers(layers: Any) -> None:
    if isinstance(layers, str):
        require(len(layers) > 0, "layers", layers, "must be a non-empty regular expression")
        check_regex("layers", layers)
        return
    if isinstance(layers, range):
        require(layers.step == 1 and len(layers) > 0, "layers", layers, "must be a non-empty range with step 1")
        return
    require(isinstance(layers, (list, tuple)) and len(layers) == 2 and all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers) and layers[0] < layers[1], "layers", layers,
        "must be a range, a (first, stop) pair of block indices with first < stop, or a regular expression")
