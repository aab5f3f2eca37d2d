"""LRT against Linformer on CPU (Greenformers, Winata et al. 2020, METHODS.md entry 68; Linformer, Wang et al. 2020).

One transformer-block-sized self-attention (q, k, v, o projections + attention, dim 256, 4 heads) per sequence
length, forward only, three ways:

    dense      nn.Linear projections,     softmax(Q K^T / sqrt(d)) V            2 T^2 d + 4 T d^2 multiply-adds
    LRT        FactoredLinear at rank r,  softmax(Q K^T / sqrt(d)) V            2 T^2 d + 8 T r d
    Linformer  nn.Linear projections,     softmax(Q (E K)^T / sqrt(d)) (F V)    4 T k d + 4 T d^2

Exact attention is written out (matmul, softmax, matmul) like ``linformer_attention``, so both use the same kernels.
Times are medians over ``--reps`` interleaved repetitions, printed relative to dense beside the multiply-add ratios
of ``lrt_linear_flops`` / ``attention_flops``, followed by the formula crossover ``2 (d + k - 2r)``: the length
above which Linformer saves more multiply-adds than LRT.

    python benchmarks/greenformers.py [--seqs 64,256,1024] [--reps 5] [--batch 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
from common import interleaved_medians
from torch import Tensor, nn

from lorakit.compress import FactoredLinear
from lorakit.compress.linformer import LinformerSelfAttention, attention_flops, crossover, lrt_linear_flops

DIM, HEADS, RANK, K_PROJ = 256, 4, 64, 64


class ExactSelfAttention(nn.Module):
    """Multi-head softmax self-attention whose projections ``make(dim, dim)`` builds (Linear or FactoredLinear)."""

    def __init__(self, dim: int, heads: int, make: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (make(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, dim = x.shape                                                            # (B, T, dim)

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, dim // self.heads).transpose(1, 2)        # (B, H, T, d)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                      # (B, H, T, T)
        mixed = torch.softmax(scores, dim=-1) @ v                                      # (B, H, T, d)
        return self.o(mixed.transpose(1, 2).reshape(b, t, dim))                        # (B, T, dim)


def macs(t: int) -> dict[str, int]:
    """Multiply-adds per sequence of each variant: four projections + the attention core."""
    dense_proj = 4 * lrt_linear_flops(t, DIM, DIM)
    return {"dense": dense_proj + attention_flops(t, DIM),
            "LRT": 4 * lrt_linear_flops(t, DIM, DIM, RANK) + attention_flops(t, DIM),
            "Linformer": dense_proj + attention_flops(t, DIM, K_PROJ)}


def time_length(t: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    layers = {"dense": ExactSelfAttention(DIM, HEADS, nn.Linear),
              "LRT": ExactSelfAttention(DIM, HEADS, lambda i, o: FactoredLinear(i, o, RANK)),
              "Linformer": LinformerSelfAttention(DIM, HEADS, t, K_PROJ)}
    x = torch.randn(args.batch, t, DIM)                                                # (B, T, dim)
    steps = {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
    with torch.inference_mode():
        return interleaved_medians(steps, args.reps, args.warmup, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="64,256,1024")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"dim={DIM} heads={HEADS} LRT rank={RANK} Linformer k_proj={K_PROJ} batch={args.batch} "
          f"threads={torch.get_num_threads()} reps={args.reps} (median), forward only")
    print("\n| T | dense ms | LRT / dense time | Linformer / dense time | LRT / dense MACs | Linformer / dense MACs |")
    print("|---|---|---|---|---|---|")
    for t in (int(s) for s in args.seqs.split(",")):
        times, counts = time_length(t, args), macs(t)
        print(f"| {t} | {times['dense'] * 1e3:.2f} | {times['LRT'] / times['dense']:.2f} | "
              f"{times['Linformer'] / times['dense']:.2f} | {counts['LRT'] / counts['dense']:.2f} | "
              f"{counts['Linformer'] / counts['dense']:.2f} |")
    print(f"\nformula crossover 2 (d + k - 2r) = {crossover(DIM, K_PROJ, RANK)} tokens: below it LRT saves more "
          "multiply-adds per layer, above it Linformer does")


if __name__ == "__main__":
    main()
