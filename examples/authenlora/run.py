"""AuthenLoRA (METHODS.md entry 89): a style LoRA trained jointly with an imperceptible watermark.

One LoRA (on the UNet's attention projections and on its ResNet convolutions at both resolutions: the "expanded",
multi-scale adaptation) is trained with three terms; a small watermark extractor ``E`` (a CNN: image -> ``K`` bit
logits) is trained jointly:

    L = L_style + lambda_w L_wm + lambda_0 L_zero
    L_style = ||eps - eps_{W+BA}(x_t, t, c)||^2                          (LoRA fine-tuning on the style images)
    L_wm    = BCE(E(x0_hat_{W+BA}), m)                                   (every LoRA output carries the secret m)
    L_zero  = BCE(E(x0_hat_W), 0)                                        (clean base outputs decode to the zero message)

where ``x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)`` is the one-step image estimate. The watermark terms use
half of each batch, drawn at ``300 <= t < 800``, where the noise prediction shapes the image (at small ``t`` it barely
moves ``x0_hat``, as the last sampling steps barely move the sample). ``L_zero`` sees the base's estimates from the
same noisy style images and from noisy generic images (what the base generates). Verification decodes an image and
calls it watermarked when at least ``tau`` of its bits match ``m``. Printed: the style loss before/after, and on
images *sampled* (DDIM from noise) with the LoRA and with the base (``lorakit.disable``, same noise): bit accuracy
against ``m`` and the share verified (detection rate vs false positives). ``--zero-weight 0`` drops the zero-message
term (the paper's ablation: false positives rise).

Simplified: a tiny random UNet, synthetic 8x8 / 16x16 shapes (base data) and a fixed colour scheme on a textured
background (the style), no robustness to image edits. This shows the mechanism, not the paper's fidelity claims.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _diffusion import SHAPES, Diffusion, Prompts, colours_of, draw, example_parser, fit, pick, report, tiny_unet  # noqa: E402

BITS, TAU, WATERMARK_T = 16, 0.8, (300, 800)


def extractor() -> nn.Module:
    """The watermark decoder: image -> ``BITS`` logits."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, BITS))


def bit_accuracy(logits: Tensor, message: Tensor) -> Tensor:
    """Per-image share of decoded bits equal to ``message``."""
    return ((logits > 0).float() == message).float().mean(1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    parser.add_argument("--watermark-weight", type=float, default=1.0, help="lambda_w")
    parser.add_argument("--zero-weight", type=float, default=1.0, help="lambda_0 (0: no zero-message regulariser)")
    args = parser.parse_args(argv)
    if args.watermark_weight <= 0 or args.zero_weight < 0:
        parser.error("--watermark-weight must be > 0 and --zero-weight >= 0")
    smoke = args.smoke
    size, pre_steps, lora_steps, batch, sample_steps = (8, 10, 30, 8, 4) if smoke else (16, 300, 400, 8, 20)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    secret = torch.zeros(BITS)
    secret[torch.randperm(BITS, generator=gen)[: BITS // 2]] = 1.0

    ids = torch.randint(0, len(SHAPES), (512,), generator=gen)
    generic = draw([SHAPES[i] for i in ids], torch.rand(len(ids), 3, generator=gen) * 2 - 1, size, gen)
    style_ids = torch.randint(0, 4, (128,), generator=gen)
    style = draw([SHAPES[i] for i in style_ids], colours_of(["yellow"] * len(style_ids)), size, gen,
                 background=colours_of(["blue"])[0] * 0.6, noise=0.15)
    prompts = Prompts(len(SHAPES), dim=32)
    unet = tiny_unet(smoke, cross_dim=32, seed=args.seed)
    decoder = extractor()
    diffusion = Diffusion()
    predict = lambda p: (lambda x, t: unet(x, t, prompts(p + 1)).sample)

    def pretrain_step(step: int) -> Tensor:
        i = pick(len(ids), batch, gen)
        return diffusion.loss(predict(ids[i]), generic[i], gen)

    def style_loss(g: torch.Generator) -> Tensor:
        return diffusion.loss(predict(style_ids), style, g)

    def joint_step(step: int) -> Tensor:
        """L_style on a batch of style images; L_wm and L_zero on its second half, drawn at t in WATERMARK_T."""
        i, j, half = pick(len(style_ids), batch, gen), pick(len(ids), batch // 2, gen), batch - batch // 2
        t = torch.cat([torch.randint(0, diffusion.steps, (half,), generator=gen),
                       torch.randint(*WATERMARK_T, (batch - half,), generator=gen)])
        x_t, t, eps = diffusion.noised(style[i], gen, t)
        eps_lora = predict(style_ids[i])(x_t, t)
        x_gen, _, _ = diffusion.noised(generic[j], gen, t[half:])  # what the base generates, at the same t
        x_base, t_base, p_base = torch.cat([x_t[half:], x_gen]), t[half:].repeat(2), torch.cat([style_ids[i[half:]],
                                                                                                ids[j]])
        with torch.no_grad(), lorakit.disable(unet):
            x0_base = diffusion.x0(x_base, t_base, predict(p_base)(x_base, t_base))
        x0_lora = diffusion.x0(x_t[half:], t[half:], eps_lora[half:])
        wm = F.binary_cross_entropy_with_logits(decoder(x0_lora), secret.expand(len(x0_lora), BITS))
        zero = F.binary_cross_entropy_with_logits(decoder(x0_base), torch.zeros(len(x0_base), BITS))
        return (eps_lora - eps).pow(2).mean() + args.watermark_weight * wm + args.zero_weight * zero

    fit(unet.parameters(), pretrain_step, pre_steps, lr=1e-3)  # the base model, on generic shapes
    unet.eval()
    with torch.no_grad():
        before = style_loss(torch.Generator().manual_seed(1234)).item()
    lorakit.adapt(unet, lorakit.LoraConfig(r=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1",
                                                                    "conv2"]))
    unet.train()
    fit([{"params": list(lorakit.trainable_parameters(unet).values())},
         {"params": list(decoder.parameters()), "lr": 1e-2}], joint_step, lora_steps, lr=3e-3)
    unet.eval()
    held = torch.arange(4).repeat(4)
    with torch.no_grad():
        after = style_loss(torch.Generator().manual_seed(1234)).item()
        lora_images = diffusion.sample(predict(held), (len(held), 3, size, size), sample_steps,
                                       torch.Generator().manual_seed(99))
        with lorakit.disable(unet):
            base_images = diffusion.sample(predict(held), (len(held), 3, size, size), sample_steps,
                                           torch.Generator().manual_seed(99))
        lora_acc, base_acc = bit_accuracy(decoder(lora_images), secret), bit_accuracy(decoder(base_images), secret)
    return report(f"AuthenLoRA: {BITS}-bit watermark, verified at >= {TAU:.0%} matching bits", {
        "style_loss_before": before, "style_loss_after": after,
        "bit_accuracy_lora": lora_acc.mean().item(), "bit_accuracy_base": base_acc.mean().item(),
        "detection_rate_lora": (lora_acc >= TAU).float().mean().item(),
        "false_positive_rate_base": (base_acc >= TAU).float().mean().item(),
        "image_change_lora_vs_base": (lora_images - base_images).abs().mean().item()})


if __name__ == "__main__":
    main()
