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

Assumed / not implemented: ties at the threshold are broken by ``torch.topk``; the paper's *progressive*
re-selection of ineffective parameters during training changes the mask and is not offered (the mask is fixed
at adapt time); ``fraction`` defaults to 0.1 (the paper's 10-20% range).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..hooks import TrainingHook, training_rule
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
    """

    fraction: float = 0.1
    nuclear_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1, "fraction", self.fraction,
                "must be in (0, 1]")


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

    def update(self) -> Tensor:
        """``dW = M (.) P`` as a dense tensor of the weight's canonical shape."""
        flat = self.sara_values.new_zeros(self.shape).flatten()
        return flat.index_put((self.sara_index,), self.sara_values).view(self.shape)

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


@training_rule("sara")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, SaraConfig)
    return [SaraNuclear(name, config.nuclear_weight)] if config.nuclear_weight > 0 else []


def _as_matrix(adapter: Sara) -> Tensor:
    delta = adapter.update().float()
    return delta if adapter.geometry.kind == "embedding" else delta.reshape(delta.shape[0], -1)
