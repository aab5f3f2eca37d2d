"""SLTrain (Han et al., 2024; METHODS.md entry 37): sparse plus low-rank linear layers for pre-training from scratch.

    W = s * B A + S,     B: (m, r), A: (r, n), s = alpha / r,
    S: (m, n) with a support of round(delta * m * n) entries drawn uniformly at random once and never changed;
    only the values on the support are parameters.  Trainable: r (m + n) + round(delta m n) (+ m with a bias).

The dense ``W`` is never a parameter and is not kept between forward and backward: :class:`_SparseLowRank` rebuilds
it (a scatter-add of the values onto ``s B A``) in both passes, as the paper's implementation does. Assumed where the
paper is vague: ``A`` and ``B`` start Kaiming-uniform like ``nn.Linear``'s weight, the sparse values uniform in
``+-1/sqrt(n)``, ``alpha = r`` (``s = 1``) by default; the output head is not replaced.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, require


def _dense(b: Tensor, a: Tensor, support: Tensor, values: Tensor, scale: float) -> Tensor:
    w = (b @ a).mul_(scale)  # (m, n)
    return w.view(-1).index_add_(0, support, values).view(w.shape)


class _SparseLowRank(torch.autograd.Function):
    """``y = x (s B A + S)^T`` without saving the dense weight for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, b: Tensor, a: Tensor, values: Tensor, support: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, b, a, values, support)
        ctx.scale = scale
        return x @ _dense(b, a, support, values, scale).T

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, b, a, values, support = ctx.saved_tensors
        w = _dense(b, a, support, values, ctx.scale)
        grad_x = grad_out @ w
        del w
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (m, n)
        grad_b = (grad_w @ a.T).mul_(ctx.scale)
        grad_a = (b.T @ grad_w).mul_(ctx.scale)
        return grad_x, grad_b, grad_a, grad_w.view(-1).index_select(0, support), None, None


class SparseLowRankLinear(nn.Module):
    """A linear layer parametrised as ``s B A + S`` with a fixed random sparse support (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, rank: int, density: float, bias: bool = True,
                 alpha: float | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        require(isinstance(rank, int) and 1 <= rank <= min(in_features, out_features), "rank", rank,
                f"must be an integer in [1, {min(in_features, out_features)}]")
        require(0.0 <= density <= 1.0, "density", density, "must be in [0, 1]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = (alpha if alpha is not None else rank) / rank
        nnz = round(density * in_features * out_features)
        kw = {"device": device, "dtype": dtype}
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.values = nn.Parameter(torch.empty(nnz, **kw))
        support = torch.randperm(in_features * out_features, generator=generator)[:nnz].sort().values
        self.register_buffer("support", support.to(device))  # flat indices into (m, n), fixed for good
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        with torch.no_grad():
            for factor in (self.lora_B, self.lora_A):
                bound = 1.0 / math.sqrt(factor.shape[1])
                factor.uniform_(-bound, bound, generator=generator)
            bound = 1.0 / math.sqrt(in_features)
            self.values.uniform_(-bound, bound, generator=generator)

    def weight(self) -> Tensor:
        """The dense ``(out, in)`` weight ``s B A + S`` (for analysis and export; the forward never keeps it)."""
        return _dense(self.lora_B, self.lora_A, self.support, self.values, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        y = _SparseLowRank.apply(x, self.lora_B, self.lora_A, self.values, self.support, self.scale)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.values.numel()}, bias={self.bias is not None}")


def sltrain(model: nn.Module, rank: int, density: float = 0.03, targets: str | None = None, alpha: float | None = None,
            seed: int = 0) -> list[str]:
    """Replace ``nn.Linear`` layers of ``model`` (freshly initialised, for pre-training) by SLTrain layers.

    Args:
        rank: ``r`` of every replaced layer.
        density: ``delta``, the fraction of each weight's entries on the sparse support (paper: ~0.03).
        targets: regular expression over module paths (default: every ``nn.Linear`` except the output head).
        seed: seed of the supports and initial values.

    Returns the replaced module paths.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    chosen = [(path, m) for path, m in model.named_modules()
              if isinstance(m, nn.Linear) and m is not head
              and (targets is None or re.fullmatch(targets, path) is not None)]
    if not chosen:
        raise ConfigError(f"sltrain: targets={targets!r} matches no nn.Linear layer of the model")
    generator = torch.Generator().manual_seed(seed)
    for path, linear in chosen:
        new = SparseLowRankLinear(linear.in_features, linear.out_features, rank, density, linear.bias is not None,
                                  alpha, generator, linear.weight.device, linear.weight.dtype)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)
    return [path for path, _ in chosen]
