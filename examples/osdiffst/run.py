"""OSDiffST (METHODS.md entry 88): one-step diffusion style transfer with vision conditioning and LoRA.

The generator is one UNet evaluation: the content image noised to a fixed ``t*`` (``x_t = sqrt(a) c + sqrt(1-a) eps``)
goes in, a clean image ``y = UNet(x_t, t*, cond)`` comes out (x0 prediction, as in SD-Turbo-style one-step models).
The condition is not text but a vision-condition module: a (frozen, random) tiny CLIP vision tower encodes the style
reference ``s`` and a trainable projection maps its tokens to the UNet's cross-attention width. A base one-step model
is first trained to reconstruct ``c`` (conditioned on ``c`` itself); then LoRA in the UNet (attention projections and
ResNet convolutions) plus the projection are trained on random (content, style) pairs with

    L = L_colour(y, s) + lambda * L_struct(y, c)
    L_colour = ||mu(y) - mu(s)||^2 + ||sigma(y) - sigma(s)||^2        (per-channel colour statistics)
    L_struct = 1 - mean cs-SSIM(gray(y), gray(c))                      (SSIM's contrast-structure term, 3x3 windows)

Printed, on held-out pairs: both losses before / after, and two matching rates: how often an output's colour
statistics are nearest to its own style among the batch's styles, and its structure nearest to its own content.

Simplified: tiny random models on synthetic 8x8 / 16x16 shapes (content) and two-colour textures (style); a single
view, so the paper's multi-view consistency is not reproduced. This shows the mechanism, not the paper's quality.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionModel

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _diffusion import SHAPES, Diffusion, at_least, clip_config, draw, example_parser, fit, pick, report, tiny_unet  # noqa: E402

T_STAR = 500


def colour_loss(y: Tensor, style: Tensor) -> Tensor:
    """Per-image ``||mu(y) - mu(s)||^2 + ||sigma(y) - sigma(s)||^2`` over RGB channels, ``(B,)``."""
    return ((y.mean((2, 3)) - style.mean((2, 3))).pow(2) + (y.std((2, 3)) - style.std((2, 3))).pow(2)).sum(1)


def structure_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Mean contrast-structure SSIM term of the grey images of ``a``, ``b`` (3x3 windows, range [-1, 1]), ``(B,)``."""
    a, b, c2 = a.mean(1, keepdim=True), b.mean(1, keepdim=True), (0.03 * 2) ** 2
    pool = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    mu_a, mu_b = pool(a), pool(b)
    var_a, var_b, cov = pool(a * a) - mu_a ** 2, pool(b * b) - mu_b ** 2, pool(a * b) - mu_a * mu_b
    return ((2 * cov + c2) / (var_a + var_b + c2)).mean((1, 2, 3))


def styles(n: int, size: int, gen: torch.Generator) -> Tensor:
    """Style references: stripes or checkers in a random foreground colour on a random background colour."""
    kinds = [("stripes", "checker")[i] for i in torch.randint(0, 2, (n,), generator=gen).tolist()]
    return draw(kinds, torch.rand(n, 3, generator=gen) * 2 - 1, size, gen, torch.rand(n, 3, generator=gen) * 2 - 1)


def nearest_rate(scores: Tensor) -> float:
    """Share of rows whose best-scoring column (higher = closer) is their own (the diagonal)."""
    return (scores.argmax(1) == torch.arange(len(scores))).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    parser.add_argument("--structure-weight", type=at_least(0.0), default=1.0, help="lambda of the structure loss")
    args = parser.parse_args(argv)
    smoke = args.smoke
    size, pre_steps, lora_steps, batch = (8, 15, 30, 8) if smoke else (16, 300, 300, 16)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def contents(n: int) -> Tensor:
        kinds = [SHAPES[i] for i in torch.randint(0, 4, (n,), generator=gen).tolist()]  # disc, square, ring, cross
        grey = torch.rand(n, 1, generator=gen).expand(n, 3) * 0.8 + 0.2
        return draw(kinds, grey, size, gen)

    train_c, train_s = contents(256), styles(256, size, gen)
    held_c, held_s = contents(16), styles(16, size, gen)
    width = 32
    vision = CLIPVisionModel(clip_config(size, width).vision_config).requires_grad_(False)
    unet = tiny_unet(smoke, cross_dim=width, seed=args.seed)
    project = nn.Linear(width, width)  # the trainable part of the vision-condition module
    diffusion = Diffusion()

    with torch.no_grad():  # the frozen tower's tokens of every reference, computed once
        tokens = {k: vision(pixel_values=v).last_hidden_state for k, v in
                  {"c": train_c, "s": train_s, "held": held_s}.items()}

    def one_step(content: Tensor, reference_tokens: Tensor, g: torch.Generator) -> Tensor:
        t = torch.full((len(content),), T_STAR)
        x_t = diffusion.ddpm.add_noise(content, torch.randn(content.shape, generator=g), t)
        return unet(x_t, t, project(reference_tokens)).sample

    def pretrain_step(step: int) -> Tensor:
        i = pick(len(train_c), batch, gen)
        return (one_step(train_c[i], tokens["c"][i], gen) - train_c[i]).pow(2).mean()

    def style_step(step: int) -> Tensor:
        i, j = pick(len(train_c), batch, gen), pick(len(train_s), batch, gen)
        y = one_step(train_c[i], tokens["s"][j], gen)
        return (colour_loss(y, train_s[j]) + args.structure_weight * (1 - structure_similarity(y, train_c[i]))).mean()

    @torch.no_grad()
    def evaluate(tag: str) -> dict[str, float]:
        unet.eval()
        y = one_step(held_c, tokens["held"], torch.Generator().manual_seed(1234))
        unet.train()
        n = len(y)
        pairs = lambda a: a.repeat_interleave(n, 0)
        grid = lambda b: b.repeat(n, 1, 1, 1)
        return {f"colour_loss_{tag}": colour_loss(y, held_s).mean().item(),
                f"structure_loss_{tag}": 1 - structure_similarity(y, held_c).mean().item(),
                f"style_match_{tag}": nearest_rate(-colour_loss(pairs(y), grid(held_s)).view(n, n)),
                f"content_match_{tag}": nearest_rate(structure_similarity(pairs(y), grid(held_c)).view(n, n))}

    fit([*unet.parameters(), *project.parameters()], pretrain_step, pre_steps, lr=1e-3)  # the base one-step model
    before = evaluate("before")
    lorakit.adapt(unet, lorakit.LoraConfig(r=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1",
                                                                    "conv2"]))
    fit([*lorakit.trainable_parameters(unet).values(), *project.parameters()], style_step, lora_steps, lr=2e-3)
    return report("OSDiffST: one-step stylisation, colour + structure losses on held-out pairs",
                  {**before, **evaluate("after")})


if __name__ == "__main__":
    main()
