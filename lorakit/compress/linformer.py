"""Linformer (Wang et al., 2020) beside the Low-Rank Transformer, as Greenformers (Winata et al., 2020; METHODS.md
entry 68) compares them: LRT factorises the weights, Linformer the sequence axis of attention.

Linformer projects keys and values along the sequence with learned ``E, F`` of shape ``(k, T)``:

    out = softmax(Q (E K)^T / sqrt(d)) (F V)        Q, K, V (T, d) per head;  E K, F V (k, d)

so the ``(T, T)`` score matrix becomes ``(T, k)``. Multiply-adds per layer and sequence (``d = dim``; heads split
``d``, so the totals do not depend on their number; softmax, scaling and biases are not multiply-adds):

    attention_flops, exact       QK^T + AV                       = 2 T^2 d
    attention_flops, Linformer   EK + FV + Q(EK)^T + A(FV)       = 4 T k d
    lrt_linear_flops             dense tokens d_in d_out;  factored tokens r (d_in + d_out)   (LRT, entry 68)

:func:`crossover` sets the two savings against each other (derivation in its docstring). ``E`` and ``F`` are
shared by all heads (the paper's headwise sharing) and the attention is bidirectional: ``E K`` mixes every position,
so there is no causal mask.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import require


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor) -> Tensor:
    """``softmax(Q (E K)^T / sqrt(d)) (F V)`` (B, H, T, d) for ``q, k, v`` (B, H, T, d), ``e, f`` (k_proj, T)."""
    require(q.dim() == 4 and k.shape == q.shape and v.shape == q.shape, "q, k, v",
            (tuple(q.shape), tuple(k.shape), tuple(v.shape)), "must be three (B, H, T, d) tensors of one shape")
    t = q.shape[2]
    for name, proj in (("e", e), ("f", f)):
        require(proj.dim() == 2 and proj.shape[1] == t, name, tuple(proj.shape), f"must be (k_proj, T={t})")
    require(e.shape == f.shape, "e, f", (tuple(e.shape), tuple(f.shape)), "must have the same k_proj")
    keys = e @ k                                                         # (k_proj, T) @ (B, H, T, d) -> (B, H, kp, d)
    values = f @ v                                                       # (B, H, kp, d)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])         # (B, H, T, kp)
    return torch.softmax(scores, dim=-1) @ values                        # (B, H, T, d)


class LinformerSelfAttention(nn.Module):
    """Multi-head self-attention over exactly ``seq_len`` tokens with :func:`linformer_attention`.

    ``q, k, v, o`` are ``nn.Linear(dim, dim)`` (so lorakit's adapters, and LRT's :class:`FactoredLinear`, reach
    them); ``e, f`` are ``(k_proj, seq_len)`` parameters drawn from ``N(0, 1/k_proj)`` (variance ``1/k_proj``).
    """

    def __init__(self, dim: int, heads: int, seq_len: int, k_proj: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("seq_len", seq_len), ("k_proj", k_proj)):
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(isinstance(heads, int) and heads >= 1 and dim % heads == 0, "heads", heads,
                f"must be an integer >= 1 dividing dim={dim}")
        self.dim, self.heads, self.seq_len, self.k_proj = dim, heads, seq_len, k_proj
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.e = nn.Parameter(torch.randn(k_proj, seq_len) / math.sqrt(k_proj))
        self.f = nn.Parameter(torch.randn(k_proj, seq_len) / math.sqrt(k_proj))

    def forward(self, x: Tensor) -> Tensor:
        require(x.dim() == 3 and tuple(x.shape[1:]) == (self.seq_len, self.dim), "x", tuple(x.shape),
                f"must be (B, seq_len={self.seq_len}, dim={self.dim})")
        b, t, dim = x.shape                                                  # (B, T, dim)

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, T, d)

        mixed = linformer_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), self.e, self.f)
        return self.o(mixed.transpose(1, 2).reshape(b, t, dim))              # (B, T, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, seq_len={self.seq_len}, k_proj={self.k_proj}"


def _positive(**values: int) -> None:
    for name, value in values.items():
        require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")


def attention_flops(seq_len: int, dim: int, k_proj: int | None = None) -> int:
    """Multiply-adds of one sequence's attention core: ``2 T^2 d`` exact (``Q K^T``, ``A V``), or ``4 T k d`` with
    Linformer's ``k_proj`` (``E K``, ``F V``, ``Q (E K)^T``, ``A (F V)``). Projections are not included."""
    _positive(seq_len=seq_len, dim=dim)
    if k_proj is None:
        return 2 * seq_len * seq_len * dim
    _positive(k_proj=k_proj)
    return 4 * seq_len * k_proj * dim


def lrt_linear_flops(tokens: int, d_in: int, d_out: int, rank: int | None = None) -> int:
    """Multiply-adds of a linear layer over ``tokens``: ``tokens d_in d_out`` dense, or ``tokens r (d_in + d_out)``
    factorised at ``rank`` r (LRT's ``up(down(x))``). Biases are not counted."""
    _positive(tokens=tokens, d_in=d_in, d_out=d_out)
    if rank is None:
        return tokens * d_in * d_out
    _positive(rank=rank)
    return tokens * rank * (d_in + d_out)


def crossover(dim: int, k_proj: int, rank: int) -> int:
    """The sequence length ``T* = 2 (dim + k_proj - 2 rank)`` above which Linformer saves more multiply-adds per
    layer than LRT; below it LRT saves more, at it they tie.

    Per layer and sequence of ``T`` tokens, from :func:`attention_flops` and :func:`lrt_linear_flops`:

        Linformer saving  2 T^2 d - 4 T k d           = 2 T d (T - 2k)
        LRT saving        4 (T d^2 - T r (d + d))     = 4 T d (d - 2r)     (q, k, v, o are the d x d projections)

    Linformer saves more iff ``2 T d (T - 2k) > 4 T d (d - 2r)``, and dividing by ``2 T d > 0`` gives
    ``T - 2k > 2 (d - 2r)``, i.e. ``T > 2 (d + k - 2r)``. Both savings grow with ``T`` but Linformer's as ``T^2``,
    hence a single crossover. A result <= 0 (``rank >= (dim + k_proj) / 2``) means Linformer saves more at every
    ``T``.
    """
    _positive(dim=dim, k_proj=k_proj, rank=rank)
    return 2 * (dim + k_proj - 2 * rank)
