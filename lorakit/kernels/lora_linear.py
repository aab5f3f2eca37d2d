"""Fused dense linear + LoRA: ``y = x W^T + b + s (x A^T) B^T`` as one autograd node.

Following the low-rank gradient order of *Computational Limits of LoRA* (METHODS.md entry 82), the dense
update ``B A`` is never formed; the backward is

    h      = x A^T                      # (N, r), saved from forward
    g_h    = s * g B                    # (N, r)
    dB     = s * g^T h                  # (d_out, r)
    dA     = g_h^T x                    # (r, d_in)
    dx     = g W + g_h A                # one GEMM plus one accumulating GEMM

Compared with the unfused graph this saves the elementwise scale and add over the ``(N, d_out)`` output, the
separate ``(N, d_in)`` gradient sum, and keeps only ``x`` and ``h`` for backward.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        h = x2 @ a.t()  # (N, r)
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, d_out)
        out.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2 if a.requires_grad else None, h if b.requires_grad else None, weight, a, b)
        ctx.scale = scale
        ctx.shape = shape
        ctx.bias_grad = bias is not None and bias.requires_grad
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2, h, weight, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        g_h = (g @ b).mul_(ctx.scale)  # (N, r)
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(g @ weight, g_h, a).reshape(ctx.shape)
        if ctx.needs_input_grad[3]:
            grad_a = g_h.t() @ x2
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h).mul_(ctx.scale)
        if ctx.bias_grad:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``x W^T + bias + scale * (x A^T) B^T`` with a low-rank backward; ``weight`` is frozen."""
    return _LoraLinear.apply(x, weight, bias, a, b, scale)
