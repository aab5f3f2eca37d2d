"""Training hooks: how methods that change ranks, layers or update rules plug into *any* training loop.

A hook sees the model and optimizer at five points of a step. The lorakit :class:`~lorakit.train.loop.Trainer`
calls them, and a user's own loop calls them through :class:`HookList` in the same order::

    hooks = HookList([SomeHook(...)])
    hooks.on_train_begin(model, optimizer)
    for step in range(steps):
        hooks.before_forward(model, step)                  # e.g. sample DyLoRA's rank, perturb weights (GGPO)
        loss = compute_loss(model, batch)
        extra = hooks.forward_loss(model)                   # e.g. a router's load balance (each forward)
        (loss if extra is None else loss + extra).backward()
        extra = hooks.regulariser(model)                    # e.g. AdaLoRA / PEGO orthogonality (once per step)
        if extra is not None:
            extra.backward()
        hooks.before_step(model, optimizer, step)          # e.g. restore GGPO weights, edit gradients
        optimizer.step(); optimizer.zero_grad()
        hooks.after_step(model, optimizer, step)           # e.g. SoRA's proximal step, prune/grow ranks, LISA

A hook that changes which tensors are trained (pruning, growing, freezing layers) must update the optimizer too
(see :func:`replace_parameter`), so no optimizer ever holds a stale tensor or moment. The Trainer reads the trained
tensors from the optimizer's parameter groups every step, so such changes take effect at once.

Hooks with state (schedules, samplers) return it from :meth:`TrainingHook.state_dict` as plain tensors and
containers; checkpoints store it and :meth:`TrainingHook.load_state_dict` restores it *before* the adapter tensors
and optimizer are loaded, so a hook can first reshape the adapter to the ranks the checkpoint holds.

A method that changes things while it trains (SoRA's gates, DyLoRA's rank sampling, LaMDA's freezing, ...) registers
its rule beside it with :func:`training_rule`; trainers ask :func:`training_hooks` for the hooks of each adapter they
train, without knowing the method. Every such hook is built for one adapter name and touches only that adapter, so
two adapters of the same method trained together in one model never reach each other.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .errors import LorakitError
from .registry import Registry

if TYPE_CHECKING:
    from .config import AdapterConfig


class TrainingHook:
    """Base class: every method is a no-op; override the points you need."""

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Once, before the first step (also after a resumption)."""

    def before_forward(self, model: nn.Module, step: int) -> None:
        """Before the step's first forward pass; ``step`` counts completed optimizer steps."""

    def forward_loss(self, model: nn.Module) -> Tensor | None:
        """A term added to the loss of the forward pass just run, before its backward: losses of that forward's
        activations (a router's load balance). Trainers weight it by the micro-batch's share of the step."""
        return None

    def regulariser(self, model: nn.Module) -> Tensor | None:
        """A term added to the loss once per optimizer step (its gradient is accumulated before the step)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Numbers logged with each step (e.g. routing statistics); keys are prefixed by the hook's own name."""
        return {}

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After all backward passes and gradient clipping, before ``optimizer.step()``."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After ``optimizer.step()``; ``step`` is the number of completed steps including this one."""

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume exactly (plain tensors and containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore :meth:`state_dict`'s output; may reshape the adapter of ``model`` to the saved ranks."""
        if state:
            raise LorakitError(f"{type(self).__name__} keeps no state but the checkpoint holds some: {sorted(state)}")


class HookList(TrainingHook):
    """Several hooks called in order (regularisers summed); itself a hook."""

    def __init__(self, hooks: Iterable[TrainingHook] = ()) -> None:
        self.hooks = list(hooks)
        for hook in self.hooks:
            if not isinstance(hook, TrainingHook):
                raise LorakitError(f"hooks must be TrainingHook instances, got {type(hook).__name__}")

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for hook in self.hooks:
            hook.on_train_begin(model, optimizer)

    def before_forward(self, model: nn.Module, step: int) -> None:
        for hook in self.hooks:
            hook.before_forward(model, step)

    def forward_loss(self, model: nn.Module) -> Tensor | None:
        return summed(hook.forward_loss(model) for hook in self.hooks)

    def regulariser(self, model: nn.Module) -> Tensor | None:
        return summed(hook.regulariser(model) for hook in self.hooks)

    def metrics(self) -> dict[str, float]:
        return {k: v for hook in self.hooks for k, v in hook.metrics().items()}

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for hook in self.hooks:
            hook.before_step(model, optimizer, step)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for hook in self.hooks:
            hook.after_step(model, optimizer, step)

    def state_dict(self) -> dict[str, Any]:
        return {"hooks": [hook.state_dict() for hook in self.hooks]}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        saved: Sequence[dict[str, Any]] = state.get("hooks", [])
        if len(saved) != len(self.hooks):
            raise LorakitError(f"the checkpoint holds the state of {len(saved)} training hooks but this run has "
                               f"{len(self.hooks)}; resume with the same hooks")
        for hook, hook_state in zip(self.hooks, saved):
            hook.load_state_dict(hook_state, model)


def summed(terms: Iterable[Tensor | None]) -> Tensor | None:
    """The sum of the scalar terms that are not ``None`` (``None`` when none is)."""
    present = [t.reshape(()) for t in terms if t is not None]
    return torch.stack(present).sum() if present else None


def optimized_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every tensor the optimizer updates, in parameter-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def replace_parameter(optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor | None,
                      keep: Tensor | None = None, dim: int = 0) -> None:
    """Swap ``old`` for ``new`` in ``optimizer`` and carry its per-element state (e.g. Adam's moments) over.

    Args:
        old: a tensor the optimizer currently updates.
        new: its replacement (``None``: stop optimizing ``old`` and drop its state, e.g. a frozen layer).
        keep: indices along ``dim`` of ``old`` that survive into ``new`` (pruning) — state rows are gathered;
            when ``new`` is larger along ``dim`` (growing), the kept rows are copied to the front and the rest
            of the state is zero. ``None``: shapes must match and state is moved as is.
        dim: the axis along which ranks are pruned or grown.
    """
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is not old:
                continue
            state = optimizer.state.pop(old, {})
            if new is None:
                del group["params"][i]
                return
            group["params"][i] = new
            optimizer.state[new] = {k: _carry(v, old, new, keep, dim) for k, v in state.items()}
            return
    raise LorakitError("replace_parameter: the optimizer does not update the given tensor")


def _carry(value: Any, old: Tensor, new: Tensor, keep: Tensor | None, dim: int) -> Any:
    if not isinstance(value, Tensor) or value.shape != old.shape:
        return value  # scalars such as Adam's step count
    if keep is None:
        if new.shape != old.shape:
            raise LorakitError(f"replace_parameter: shapes differ ({tuple(old.shape)} -> {tuple(new.shape)}); "
                               f"give `keep` to say which rows survive")
        return value
    kept = value.index_select(dim, keep.to(value.device))
    if kept.shape == new.shape:
        return kept.contiguous()
    grown = torch.zeros(new.shape, dtype=value.dtype, device=value.device)
    grown.narrow(dim, 0, kept.shape[dim]).copy_(kept)
    return grown


RuleFactory = Callable[["AdapterConfig", str, int], list[TrainingHook]]
RULES: Registry[RuleFactory] = Registry("training rule")


def training_rule(method: str) -> Callable[[RuleFactory], RuleFactory]:
    """Register ``factory(config, name, steps) -> hooks``: the hooks that method ``method`` needs while its adapter
    ``name`` trains for ``steps`` optimizer steps. Registered in the method's file, or beside the method's family
    (the rank hooks of :mod:`lorakit.rank`)."""
    return RULES.decorator(method)


def training_hooks(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    """The hooks adapter ``name`` (of ``config.method``) needs while it trains for ``steps`` steps; ``[]`` for the
    methods without a training-time rule."""
    return RULES.get(config.method)(config, name, steps) if config.method in RULES else []
