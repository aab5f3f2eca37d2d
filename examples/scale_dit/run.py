"""Scale-DiT (METHODS.md entry 87): hierarchical local attention with low-resolution global guidance, bridged by LoRA.

Each DiT self-attention layer's dense attention over all ``n`` tokens is replaced (a diffusers attention processor,
:class:`LocalGlobalProcessor`) by: the token grid cut into ``w x w`` windows; every query attends to the keys of its
own window plus ``g x g`` global guidance tokens, the token grid average-pooled to ``g x g`` (a low-resolution view of
the whole image whose positions are the pooled, i.e. rescaled, positional embeddings: the "scaled anchors"):

    out_i = softmax(q_i [K_win(i); K_glob]^T / sqrt(d)) [V_win(i); V_glob],  K_glob = W_k pool(X),  V_glob = W_v pool(X)

so attention costs ``n (w^2 + g^2)`` scores instead of ``n^2``. A base DiT is trained with dense attention; its
attention is swapped for the local/global one and a LoRA on the attention projections (``to_q, to_k, to_v, to_out.0``,
shared by the local and the global pathway) is trained with the denoising loss to bridge the two pathways. Printed:
the denoising loss of the base (dense), of the local model before and after LoRA training, and at a larger resolution
the attention FLOPs and score memory of local vs dense (computed) and a timed forward of the whole DiT.

Simplified: a tiny random DiT in pixel space (no VAE) on synthetic 8x8 / 16x16 shapes, a few hundred steps; no
Hilbert-curve token permutation or fused masked kernel (windows are batched into one ``scaled_dot_product_attention``
call). This shows the mechanism, not the paper's 4K quality or speed claims.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _diffusion import SHAPES, Diffusion, draw, example_parser, fit, pick, report, timed  # noqa: E402


def local_global_attention(q: Tensor, k: Tensor, v: Tensor, k_glob: Tensor, v_glob: Tensor, heads: int,
                           window: int) -> Tensor:
    """Windowed attention plus shared global keys. ``q, k, v``: ``(B, n, C)`` on a square ``side x side`` token grid;
    ``k_glob, v_glob``: ``(B, m, C)`` (``m = 0``: purely local). Returns ``(B, n, C)``."""
    b, n, c = q.shape
    side, d = int(n ** 0.5), c // heads
    if side * side != n or side % window:
        raise ValueError(f"{n} tokens are not a square grid divisible into {window}x{window} windows")
    per = side // window

    def windows(x: Tensor) -> Tensor:  # (B, n, C) -> (B * per^2, heads, w^2, d)
        x = x.view(b, per, window, per, window, heads, d).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b * per * per, heads, window * window, d)

    def shared(x: Tensor) -> Tensor:  # (B, m, C) -> (B * per^2, heads, m, d), the same for every window
        x = x.view(b, 1, -1, heads, d).transpose(2, 3).expand(b, per * per, heads, x.shape[1], d)
        return x.reshape(b * per * per, heads, -1, d)

    keys = torch.cat([windows(k), shared(k_glob)], dim=2)
    values = torch.cat([windows(v), shared(v_glob)], dim=2)
    out = F.scaled_dot_product_attention(windows(q), keys, values)
    out = out.view(b, per, per, heads, window, window, d).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, n, c)


class LocalGlobalProcessor:
    """A diffusers attention processor: ``window x window`` local attention plus ``guide x guide`` pooled global
    tokens, through the layer's own (LoRA-adapted) projections."""

    def __init__(self, window: int, guide: int) -> None:
        if window < 1 or guide < 0:
            raise ValueError(f"window must be >= 1 and guide >= 0, got {window}, {guide}")
        self.window, self.guide = window, guide

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, **_: object) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LocalGlobalProcessor is for unmasked self-attention only")
        b, n, c = hidden_states.shape
        side = int(n ** 0.5)
        grid = hidden_states.transpose(1, 2).reshape(b, c, side, side)
        glob = F.adaptive_avg_pool2d(grid, self.guide).flatten(2).transpose(1, 2)  # (B, guide^2, C)
        out = local_global_attention(attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states),
                                     attn.to_k(glob), attn.to_v(glob), attn.heads, self.window)
        return attn.to_out[1](attn.to_out[0](out))


def attention_cost(side: int, window: int, guide: int, dim: int) -> dict[str, float]:
    """FLOPs of ``Q K^T`` and ``P V`` and score-matrix entries per head, one layer, one image: dense vs local."""
    n, keys = side * side, window * window + guide * guide
    return {"dense_flops": 4 * n * n * dim, "local_flops": 4 * n * keys * dim, "dense_scores": n * n,
            "local_scores": n * keys}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    args = parser.parse_args(argv)
    smoke = args.smoke
    size, window, guide, big = (8, 4, 2, 32) if smoke else (16, 4, 4, 64)
    pre_steps, lora_steps, batch = (40, 40, 8) if smoke else (400, 300, 16)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    labels = torch.arange(len(SHAPES)).repeat(16 if smoke else 64)
    images = draw([SHAPES[i] for i in labels], torch.rand(len(labels), 3, generator=gen) * 2 - 1, size, gen)
    held = torch.arange(len(SHAPES)).repeat(8)
    held_images = draw([SHAPES[i] for i in held], torch.rand(len(held), 3, generator=gen) * 2 - 1, size, gen)
    heads, head_dim = (2, 16) if smoke else (4, 16)
    dit = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=3,
                                num_layers=2 if smoke else 4, sample_size=size, patch_size=1,
                                num_embeds_ada_norm=len(SHAPES))
    diffusion = Diffusion()

    def loss_on(x0: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        return diffusion.loss(lambda x, t: dit(x, t, class_labels=y).sample, x0, g)

    def held_loss() -> float:  # the same noise and timesteps every time
        dit.eval()
        with torch.no_grad():
            value = loss_on(held_images, held, torch.Generator().manual_seed(1234)).item()
        dit.train()
        return value

    def train_step(step: int) -> Tensor:
        idx = pick(len(labels), batch, gen)
        return loss_on(images[idx], labels[idx], gen)

    fit(dit.parameters(), train_step, pre_steps, lr=1e-3)  # the base DiT, dense attention
    dense_loss = held_loss()
    attns = [m for m in dit.modules() if isinstance(m, Attention)]
    for attn in attns:
        attn.set_processor(LocalGlobalProcessor(window, guide))
    local_before = held_loss()
    lorakit.adapt(dit, lorakit.LoraConfig(r=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    fit(lorakit.trainable_parameters(dit).values(), train_step, lora_steps, lr=2e-3)
    local_after = held_loss()

    cost = attention_cost(big, window, guide, heads * head_dim)
    dit.eval()
    x_big, t_big, y_big = torch.randn(1, 3, big, big, generator=gen), torch.tensor([500]), torch.tensor([0])
    with torch.no_grad():
        local_ms = timed(lambda: dit(x_big, t_big, class_labels=y_big))
        for attn in attns:
            attn.set_processor(AttnProcessor2_0())
        dense_ms = timed(lambda: dit(x_big, t_big, class_labels=y_big))
    return report(f"Scale-DiT: local {window}x{window} windows + {guide}x{guide} global tokens", {
        "dense_base_loss": dense_loss, "local_loss_before": local_before, "local_loss_after": local_after,
        "hires_tokens": big * big, "flops_ratio": cost["local_flops"] / cost["dense_flops"],
        "score_memory_ratio": cost["local_scores"] / cost["dense_scores"],
        "dense_scores_mb_per_layer": cost["dense_scores"] * heads * 4 / 2 ** 20,
        "local_scores_mb_per_layer": cost["local_scores"] * heads * 4 / 2 ** 20,
        "dense_forward_ms": dense_ms, "local_forward_ms": local_ms})


if __name__ == "__main__":
    main()
