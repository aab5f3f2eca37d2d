"""Fused dense linear + LoRA (and DoRA's column scaling) as one autograd node.

    y   = x W^T + s (x A^T) B^T                 # LoRA on a frozen W
    out = g * y + b        (DoRA: g = m / ||W + s B A||_c, one factor per output unit; LoRA: g = 1)

Following the low-rank gradient order of *Computational Limits of LoRA* (METHODS.md entry 82), ``B A`` is never
formed; with ``h = x A^T`` saved from forward and ``G`` the gradient of ``out``:

    G_y = g * G                 dg = sum_rows(G * y)          (DoRA only; ``y`` saved)
    G_h = s G_y B               dB = s (h^T G_y)^T            dA = G_h^T x
    dx  = G_y W + G_h A         (one GEMM and one accumulating GEMM)

Compared with the unfused graph this drops the elementwise scale and add passes over the ``(N, d_out)`` output
and the separate ``(N, d_in)`` gradient sum, and saves only ``x``, ``h`` (and ``y`` for DoRA) for backward.

Mixed precision: the products run in the activations' dtype (bf16 on a GPU) while the factors and DoRA's magnitude
keep theirs (float32 master weights, as automatic mixed precision does): ``A``, ``B`` and ``g`` are cast once per
call (``r x (d_in + d_out)`` elements) and their gradients are returned in their own dtype.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float,
                col_scale: Tensor | None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        a_c, b_c = a.to(x.dtype), b.to(x.dtype)  # no copy when the factors have the activations' dtype
        g = None if col_scale is None else col_scale.to(x.dtype)
        h = x2 @ a_c.t()  # (N, r)
        if g is None:
            y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, d_out)
            y.addmm_(h, b_c.t(), alpha=scale)
            out = y
        else:
            y = torch.addmm(x2 @ weight.t(), h, b_c.t(), alpha=scale)  # (N, d_out), bias-free
            out = y * g if bias is None else torch.addcmul(bias, y, g)
        ctx.save_for_backward(x2 if a.requires_grad else None, h, weight, a_c, b_c, g,
                              y if col_scale is not None and col_scale.requires_grad else None)
        ctx.scale, ctx.shape = scale, shape
        ctx.dtypes = (a.dtype, b.dtype, None if col_scale is None else col_scale.dtype)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2, h, weight, a, b, col_scale, y = ctx.saved_tensors
        a_dtype, b_dtype, col_dtype = ctx.dtypes
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        grad_col = None
        if col_scale is not None:
            if y is not None:
                grad_col = (g * y).sum(0).to(col_dtype)  # einsum("nd,nd->d") lowers to a slow batched GEMM on CPU
            g = g * col_scale
        g_h = (g @ b).mul_(ctx.scale)  # (N, r)
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(g_h, a).reshape(ctx.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = (g_h.t() @ x2).to(a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (h.t() @ g).mul_(ctx.scale).t().to(b_dtype)  # (d_out, r); r x N @ N x d_out: the fast order
        return grad_x, None, grad_bias, grad_a, grad_b, None, grad_col


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float,
                col_scale: Tensor | None = None) -> Tensor:
    """``col_scale * (x W^T + scale * (x A^T) B^T) + bias`` with a low-rank backward; ``weight`` is frozen and has
    ``x``'s dtype, the products run in it (``a``, ``b``, ``col_scale`` may be float32 master weights)."""
    return _LoraLinear.apply(x, weight, bias, a, b, scale, col_scale)
