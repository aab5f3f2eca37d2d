"""GaLore (Zhao et al., 2024; METHODS.md entry 33): AdamW whose moments live in a rank-``r`` gradient subspace.

For each projected ``(m, n)`` weight (see :mod:`.projection` for the side and the staggered refresh):

    R_t = P^T G_t                        (r, n)   projected gradient
    N_t = Adam(R_t)                      (r, n)   moments M, V of shape (r, n) instead of (m, n)
    W  <- W (1 - lr * wd) - lr * alpha * P N_t

Tensors that are not projected (vectors, matrices whose smaller side is below the rank) get plain AdamW in the same
optimizer. The state of a projected tensor is plain tensors and ints — ``exp_avg``, ``exp_avg_sq`` (``r x n``),
``projector`` (``m x r``), ``step``, ``offset`` — so ``optimizer.state_dict()`` saves with ``torch.save`` and loads
with ``weights_only=True`` (galore-torch keeps projector objects, which cannot). Fira and Natural GaLore subclass
:class:`ProjectedAdamW` and override :meth:`~ProjectedAdamW.precondition` / :meth:`~ProjectedAdamW.full_update`.

Assumed where the paper is vague: the moments are kept (not rotated) across a refresh, as in the reference code;
the first update of every tensor fits its projector (so step 1 fits all of them; staggering applies afterwards).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError, require
from .projection import due, fit_projector, project, project_back, projected_shape, refresh_offset
from .registry import OPTIMIZERS

BASE_OPTIONS = ("rank", "update_gap", "scale", "betas", "eps", "stagger", "per_layer")


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's gradient projection on the param groups whose ``rank`` is set.

    Args:
        params: tensors or param groups; a group with ``rank=None`` is plain AdamW.
        rank: projection rank ``r`` (``r <= min(m, n)`` for every matrix of a projected group).
        update_gap: ``T``, steps between projector refreshes of one tensor.
        scale: ``alpha``, the multiplier of the projected update (GaLore's default 0.25).
        stagger: spread refreshes over the ``T`` steps instead of refreshing every tensor on the same step.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int | None = 128, update_gap: int = 200,
                 scale: float = 0.25, stagger: bool = True) -> None:
        require(lr >= 0, "lr", lr, "must be >= 0")
        require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "betas", betas, "must be two values in [0, 1)")
        require(eps > 0, "eps", eps, "must be > 0")
        require(weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")
        require(isinstance(update_gap, int) and update_gap >= 1, "update_gap", update_gap, "must be an integer >= 1")
        require(scale > 0, "scale", scale, "must be > 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_gap=update_gap, scale=scale)
        super().__init__(params, defaults)
        projected = [p for g in self.param_groups if g["rank"] is not None for p in g["params"]]
        for group in self.param_groups:
            rank = group["rank"]
            if rank is None:
                continue
            for p in group["params"]:
                require(isinstance(rank, int) and p.ndim == 2 and 1 <= rank <= min(p.shape), "rank", rank,
                        f"must be an integer in [1, min(m, n)] of every projected matrix; got a tensor of shape "
                        f"{tuple(p.shape)}")
        self._offsets = {p: refresh_offset(i, len(projected), update_gap) if stagger else 0
                         for i, p in enumerate(projected)}
        # by index: load_state_dict replaces the group dicts (and a scheduler edits the new ones)
        self._group_index = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    @torch.no_grad()
    def step_parameter(self, param: Tensor) -> None:
        """Update one tensor from its gradient now (per-layer mode calls this from a backward hook)."""
        index = self._group_index.get(param)
        if index is None:
            raise ConfigError("step_parameter: this optimizer does not update the given tensor")
        self._update(param, self.param_groups[index])

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise ConfigError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        rank = group["rank"]
        if not state:
            shape = projected_shape(p.shape, rank) if rank is not None else p.shape
            state.update(step=0, exp_avg=p.new_zeros(shape), exp_avg_sq=p.new_zeros(shape))
            if rank is not None:
                state.update(projector=p.new_zeros(min(p.shape), rank), offset=self._offsets.get(p, 0))
                self.init_state(state, p, shape)
        if rank is None:
            direction = self.adam_direction(state, grad, group)
        else:
            if due(state["step"], state["offset"], group["update_gap"]):
                state["projector"].copy_(fit_projector(grad, rank))
                self.on_refresh(state)
            low = self.precondition(state, project(grad, state["projector"]), group)
            direction = self.full_update(state, grad, low, self.adam_direction(state, low, group), group)
            direction = direction.mul_(group["scale"])
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])

    @staticmethod
    def adam_direction(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        """Adam's bias-corrected ``m_hat / (sqrt(v_hat) + eps)`` for ``grad``, advancing the moments in ``state``."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(group["eps"])
        return state["exp_avg"] / (1.0 - beta1 ** t) / denom

    # Extension points for the GaLore family ---------------------------------------------------------------------

    def init_state(self, state: dict[str, Any], p: Tensor, low_shape: tuple[int, ...]) -> None:
        """Add a variant's own state tensors for a projected tensor (called once)."""

    def on_refresh(self, state: dict[str, Any]) -> None:
        """Called after a tensor's projector was refitted."""

    def precondition(self, state: dict[str, Any], low: Tensor, group: dict[str, Any]) -> Tensor:
        """Transform the projected gradient before Adam (GaLore: unchanged)."""
        return low

    def full_update(self, state: dict[str, Any], grad: Tensor, low: Tensor, normalized: Tensor,
                    group: dict[str, Any]) -> Tensor:
        """The full-size update direction from Adam's low-rank output (GaLore: ``P N``)."""
        return project_back(normalized, state["projector"], grad.shape)


def projected_groups(named_params: Mapping[str, nn.Parameter], rank: int) -> list[dict[str, Any]]:
    """Matrices whose smaller side is at least ``rank`` are projected; everything else is plain AdamW."""
    require(isinstance(rank, int) and rank >= 1, "rank", rank, "must be a positive integer")
    projected = [p for p in named_params.values() if p.ndim == 2 and min(p.shape) >= rank]
    chosen = {id(p) for p in projected}
    plain = [p for p in named_params.values() if id(p) not in chosen]
    groups: list[dict[str, Any]] = [{"params": projected, "rank": rank}] if projected else []
    return groups + ([{"params": plain, "rank": None}] if plain else [])


def build_projected(cls: type[ProjectedAdamW], name: str, named_params: Mapping[str, nn.Parameter], lr: float,
                    weight_decay: float, options: dict[str, Any], own: tuple[str, ...] = ()) -> ProjectedAdamW:
    """A registry factory body shared by the family: check options, group tensors, optionally go per-layer."""
    allowed = BASE_OPTIONS + own
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"optimizer {name!r} has no option(s) {unknown}; allowed: {', '.join(allowed)}")
    options = dict(options)
    per_layer = bool(options.pop("per_layer", False))
    rank = options.pop("rank", 128)
    optimizer = cls(projected_groups(named_params, rank), lr=lr, weight_decay=weight_decay, rank=rank, **options)
    if per_layer:
        from .per_layer import per_layer_updates

        per_layer_updates(optimizer)
    return optimizer


@OPTIMIZERS.decorator("galore")
def galore(named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
           roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """GaLore-AdamW. Options: rank (128), update_gap (200), scale (0.25), betas, eps, stagger (true), per_layer."""
    return build_projected(ProjectedAdamW, "galore", named_params, lr, weight_decay, options)
