"""SaRA (Hu et al., 2024; METHODS.md entry 15): re-train the smallest-magnitude pretrained weights as a sparse update.

    M = [|W0| among the smallest `fraction` of entries],     dW = M (.) P,     W' = W0 + dW

Only the masked entries are parameters (``sara_values: (nnz,)``, zero at init), so gradients and optimizer state
scale with ``nnz = round(fraction * |W0|)``, not with ``|W0|``; the mask (``sara_index``, flat positions in the
canonical weight, ascending) is saved with the adapter. :func:`sara_nuclear_norm` is the paper's low-rank
regulariser ``sum_l ||dW_l||_*``, whose (sub)gradient is ``U V^T`` of each ``dW_l`` restricted to the mask.

Forward: the update has the weight's full shape at 10-20% density, where a sparse product is slower than a dense
one on every backend, so ``dW`` is scattered into a transient dense tensor and applied with the layer's own
operation (linear / convolution / embedding lookup); on a Linear with a single active adapter the base and the
update share one product, ``(W0 + dW) x``. Only ``nnz`` numbers persist (parameters, gradients, optimizer state).

Progressive re-selection (``reselect_at > 0``; the paper's "progressive parameter adjustment", done once as in
the authors' code, ``optim/adamw.py``: ``progressive_iter``). After ``t* = max(1, round(reselect_at * steps))``
optimizer steps :class:`SaraReselect` recomputes the mask from the *current* weights,

    M' = [|W0 + dW| among the smallest `fraction` of entries]          (same nnz: the threshold is recomputed)

so entries that training made large ("now effective") leave the mask and still-ineffective small weights join it.
The function is unchanged by the step: entries in ``M & M'`` keep their trained values and optimizer moments
(moved to their new slots), new entries start at 0 with zero moments, and entries in ``M - M'`` keep their trained
values frozen in ``sara_frozen_index`` / ``sara_frozen_values`` (``(nnz,)`` buffers, padding index -1, value 0), so

    dW = scatter(M', P) + scatter(M - M', P_frozen),     W0 + dW  identical before and after the step.

Unlike the authors' code, which keeps an absolute threshold (the count then varies) and restarts AdamW's state, the
count ``nnz`` stays fixed (tensor shapes, files and checkpoints keep their shapes) and surviving moments are kept;
the shared step count of Adam is not reset, so bias correction for the new entries is that of the run's step.

Assumed / not implemented: ties at the threshold are broken by ``torch.topk``; re-selection happens once (as in
the authors' code; a second one raises); ``fraction`` defaults to 0.1 (the paper's 10-20% range) and
``reselect_at`` to 0 (off, as the authors' ``progressive_iter=-1``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..hooks import TrainingHook, optimized_parameters, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import _CONV_FN, ConvGeometry, EmbeddingGeometry, Geometry
from ..hosts.host import adapters_named
from .base import Adapter, Capabilities, register_method


@dataclass(frozen=True)
class SaraConfig(AdapterConfig):
    """Config of a SaRA adapter.

    Attributes:
        fraction: share of each targeted weight, by smallest ``|w|``, that is trained; in ``(0, 1]``.
        nuclear_weight: weight of the nuclear-norm regulariser on the updates added to the training loss
            (:func:`sara_nuclear_norm`; the paper's low-rank constraint); 0: none.
        reselect_at: share of the run's optimizer steps after which the mask is re-selected once from the current
            weights (:class:`SaraReselect`, the paper's progressive parameter adjustment); 0: never; in ``[0, 1)``.
    """

    fraction: float = 0.1
    nuclear_weight: float = 0.0
    reselect_at: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1, "fraction", self.fraction,
                "must be in (0, 1]")
        require(isinstance(self.reselect_at, (int, float)) and 0 <= self.reselect_at < 1, "reselect_at",
                self.reselect_at, "must be in [0, 1)")


def apply_weight(geometry: Geometry, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The layer's own operation with a canonical-layout ``weight``: linear, convolution or embedding lookup."""
    if isinstance(geometry, ConvGeometry):
        g = geometry
        return _CONV_FN[g.ndim](x, weight, bias, g.stride, g.padding, g.dilation)
    if isinstance(geometry, EmbeddingGeometry):
        return F.embedding(x, weight, padding_idx=geometry.padding_idx)
    return F.linear(x, weight, bias)


@register_method("sara", SaraConfig)
class Sara(Adapter):
    """``delta(x) = op(x, scatter(M, P))``: the masked small weights of ``W0`` trained as a sparse update."""

    capabilities = Capabilities()

    def __init__(self, geometry: Geometry, config: SaraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        w = base.weight()
        self.shape = tuple(w.shape)
        nnz = max(1, round(config.fraction * w.numel()))
        index = torch.topk(w.detach().abs().flatten(), nnz, largest=False).indices.sort().values
        self.register_buffer("sara_index", index)  # (nnz,) flat positions of M in the canonical weight
        self.sara_values = nn.Parameter(torch.zeros(nnz, device=w.device, dtype=w.dtype))  # (nnz,)
        if config.reselect_at > 0:  # room for the entries a re-selection freezes (M - M'); -1: unused slot
            self.register_buffer("sara_frozen_index", torch.full((nnz,), -1, dtype=torch.long, device=w.device))
            self.register_buffer("sara_frozen_values", torch.zeros(nnz, device=w.device, dtype=w.dtype))

    def update(self) -> Tensor:
        """``dW = scatter(M, P) (+ scatter(M - M', P_frozen) after a re-selection)``, of the weight's canonical
        shape; frozen and trained positions are disjoint, unused frozen slots add 0 at position 0."""
        flat = self.sara_values.new_zeros(self.shape).flatten().index_put((self.sara_index,), self.sara_values)
        if hasattr(self, "sara_frozen_index"):
            frozen = self.sara_frozen_values.to(flat.dtype)
            flat = flat.index_put((self.sara_frozen_index.clamp(min=0),), frozen, accumulate=True)
        return flat.view(self.shape)

    @torch.no_grad()
    def reselect(self, base: Backend) -> tuple[Tensor, Tensor]:
        """Re-select the mask as the ``nnz`` smallest ``|W0 + dW|`` (see the module notes); returns ``(src, dst)``:
        the trained value (and optimizer moment) in slot ``src[i]`` now lives in slot ``dst[i]``."""
        if not hasattr(self, "sara_frozen_index"):
            raise LorakitError("this SaRA adapter was built with reselect_at=0; it has no room for frozen entries")
        if bool((self.sara_frozen_index >= 0).any()):
            raise LorakitError("this SaRA adapter was already re-selected once; SaRA re-selects a single time")
        old, values = self.sara_index, self.sara_values
        current = base.weight().detach().flatten().to(values.dtype) + self.update().flatten()
        new = torch.topk(current.abs(), old.numel(), largest=False).indices.sort().values
        stays = torch.isin(old, new)
        dropped = (~stays).nonzero().flatten()
        self.sara_frozen_index[:dropped.numel()] = old[dropped]
        self.sara_frozen_values[:dropped.numel()] = values[dropped].to(self.sara_frozen_values.dtype)
        src = stays.nonzero().flatten()
        dst = torch.searchsorted(new, old[src])
        moved = torch.zeros_like(values)
        moved[dst] = values[src]
        values.copy_(moved)
        values.grad = None
        old.copy_(new)
        return src, dst

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        if x.is_floating_point():  # embeddings take token ids
            x = x.to(self.sara_values.dtype)
        return apply_weight(self.geometry, x, self.update()).to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: Backend) -> Tensor | None:
        if not base.materialized or self.geometry.kind != "linear":
            return None
        w = base.weight()
        if not x.dtype == w.dtype == self.sara_values.dtype:
            return None
        return F.linear(x, w + self.update(), base.bias)  # one product for base and update

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return self.update()

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"sara_values": self.sara_values}


def sara_nuclear_norm(model: nn.Module, name: str = "default") -> Tensor:
    """``sum over the layers of SaRA adapter name of ||dW_l||_*`` (each update viewed as a matrix with one row per
    output unit).

    Add ``weight * sara_nuclear_norm(model)`` to the loss (the paper's low-rank sparse training).
    """
    terms = [torch.linalg.matrix_norm(_as_matrix(m), ord="nuc") for _, m in adapters_named(model, name, Sara)]
    if not terms:
        raise LorakitError(f"sara_nuclear_norm: the {type(model).__name__} has no SaRA adapter named {name!r}")
    return torch.stack(terms).sum()


class SaraNuclear(TrainingHook):
    """Adds ``weight * sum of the nuclear norms of adapter name's updates`` to each step's loss."""

    def __init__(self, name: str, weight: float) -> None:
        require(weight > 0, "weight", weight, "must be > 0")
        self.name, self.weight = name, weight

    def regulariser(self, model: nn.Module) -> Tensor:
        return self.weight * sara_nuclear_norm(model, self.name)


class SaraReselect(TrainingHook):
    """After optimizer step ``at`` re-selects the mask of every layer of adapter ``name`` (:meth:`Sara.reselect`)
    and moves the optimizer's per-entry state along with the values (new entries: zero); ``sara_values`` keeps its
    identity, so every optimizer and trainer holding it stays valid. Stateless: a run resumed after ``at`` does not
    re-select again (the checkpoint's buffers already hold the new mask)."""

    def __init__(self, name: str, at: int) -> None:
        require(at >= 1, "at", at, "must be >= 1")
        self.name, self.at = name, at

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step != self.at:
            return
        layers = adapters_named(model, self.name, Sara)
        if not layers:
            raise LorakitError(f"SaraReselect: the model has no SaRA adapter named {self.name!r}")
        trained = {id(p) for p in optimized_parameters(optimizer)}
        for host, adapter in layers:
            src, dst = adapter.reselect(host.backend)
            if id(adapter.sara_values) in trained:
                _move_state(optimizer, adapter.sara_values, src, dst)


@torch.no_grad()
def _move_state(optimizer: torch.optim.Optimizer, param: Tensor, src: Tensor, dst: Tensor) -> None:
    """Per-entry state of ``param`` (Adam's moments) goes from slot ``src`` to ``dst``; other slots get 0."""
    state = optimizer.state.get(param, {})
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == param.shape:  # not scalars such as the step count
            moved = torch.zeros_like(value)
            moved[dst] = value[src]
            state[key] = moved


@training_rule("sara")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, SaraConfig)
    hooks: list[TrainingHook] = [SaraNuclear(name, config.nuclear_weight)] if config.nuclear_weight > 0 else []
    if config.reselect_at > 0:
        hooks.append(SaraReselect(name, max(1, round(config.reselect_at * steps))))
    return hooks


def _as_matrix(adapter: Sara) -> Tensor:
    delta = adapter.update().float()
    return delta if adapter.geometry.kind == "embedding" else delta.reshape(delta.shape[0], -1)
