"""DataDream (METHODS.md entry 96): few-shot guided dataset generation with per-class LoRAs, then a LoRA classifier.

1. A class-conditional generator (a tiny UNet, prompts = class names) is pre-trained on a *source* domain: shapes in
   random colours on black.
2. The task's *real* domain differs (grey, noisy backgrounds, dimmer colours) and only ``k`` shots per class exist.
   DataDream fits one LoRA per class on its shots (``DataDream_cls``): all classes train in one batch, each row routed
   to its class's adapter with ``lorakit.route`` (each adapter gets gradients from its own rows only), loss
   ``||eps - eps_{W + B_c A_c}(x_t, t, c)||^2``.
3. A synthetic training set is sampled (DDIM), each row through its class's LoRA.
4. A tiny CLIP-like classifier (random towers from a transformers ``CLIPConfig``; logits = scaled cosine of the image
   embedding with the embeddings of the class-name prompts) is LoRA-fine-tuned (query/value projections and MLPs of
   both towers) on synthetic + real shots, and, as the baseline, on the real shots only, with the same steps.

Printed: the per-class LoRAs' loss on the shots before/after, and real-test accuracy of both classifiers.

Simplified: tiny random models ("pre-trained" for a few hundred steps at most) on synthetic 8x8 / 16x16 images, four
classes. This shows the pipeline, not the paper's accuracy claims; at this scale the accuracy gap varies by seed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _diffusion import Diffusion, Prompts, at_least, clip_config, draw, example_parser, fit, pick, report, tiny_unet  # noqa: E402

CLASSES = ("ring", "cross", "stripes", "checker")
VOCAB = 16  # the classifier's text vocabulary; its last token ends a prompt


def real_domain(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """The task's images: dim colours on a grey, noisy background."""
    colours = torch.rand(len(labels), 3, generator=gen) * 0.8 + 0.2
    return draw([CLASSES[k] for k in labels], colours, size, gen, torch.full((3,), -0.3), noise=0.15)


def class_names(count: int) -> Tensor:
    """Token ids of the class-name prompts ``[class k, end-of-text]``."""
    return torch.stack([torch.arange(1, count + 1), torch.full((count,), VOCAB - 1)], dim=1)


def train_classifier(images: Tensor, labels: Tensor, test: Tensor, test_labels: Tensor, steps: int, seed: int) -> float:
    """LoRA-fine-tune a fresh tiny CLIP on ``images``; its accuracy on ``test``."""
    torch.manual_seed(seed)  # every classifier starts from the same "pre-trained" towers
    clip = CLIPModel(clip_config(images.shape[-1], vocab=VOCAB))
    lorakit.adapt(clip, lorakit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "fc1", "fc2"]))
    gen = torch.Generator().manual_seed(seed)
    names = class_names(len(CLASSES))

    def logits(x: Tensor) -> Tensor:
        return clip(input_ids=names, pixel_values=x).logits_per_image

    def step(i: int) -> Tensor:
        idx = pick(len(images), 16, gen)
        return F.cross_entropy(logits(images[idx]), labels[idx])

    fit(lorakit.trainable_parameters(clip).values(), step, steps, lr=3e-3)
    with torch.no_grad():
        return (logits(test).argmax(1) == test_labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    parser.add_argument("--shots", type=at_least(1, int), default=2, help="real images per class")
    args = parser.parse_args(argv)
    smoke = args.smoke
    size, pre_steps, lora_steps, per_class, sample_steps, clf_steps = (
        (8, 10, 15, 16, 4, 25) if smoke else (16, 400, 200, 64, 20, 300))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    k = len(CLASSES)

    source_labels = torch.randint(0, k, (512,), generator=gen)
    source = draw([CLASSES[c] for c in source_labels], torch.rand(512, 3, generator=gen) * 2 - 1, size, gen)
    shot_labels = torch.arange(k).repeat_interleave(args.shots)
    shots = real_domain(shot_labels, size, gen)
    test_labels = torch.arange(k).repeat(32)
    test = real_domain(test_labels, size, gen)

    prompts = Prompts(k, dim=32)
    unet = tiny_unet(smoke, cross_dim=32, seed=args.seed)
    diffusion = Diffusion()
    predict = lambda c: (lambda x, t: unet(x, t, prompts(c + 1)).sample)

    def pretrain_step(step: int) -> Tensor:
        i = pick(len(source), 16, gen)
        return diffusion.loss(predict(source_labels[i]), source[i], gen)

    fit(unet.parameters(), pretrain_step, pre_steps, lr=1e-3)
    adapters = [f"class_{c}" for c in range(k)]
    for name in adapters:
        lorakit.adapt(unet, lorakit.LoraConfig(r=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0"]), name)
    per_row = lambda labels: [adapters[c] for c in labels]

    def shot_loss(g: torch.Generator) -> Tensor:
        with lorakit.route(unet, per_row(shot_labels)):
            return diffusion.loss(predict(shot_labels), shots, g)

    with torch.no_grad():
        before = shot_loss(torch.Generator().manual_seed(1234)).item()
    fit(lorakit.trainable_parameters(unet).values(), lambda step: shot_loss(gen), lora_steps, lr=3e-3)
    with torch.no_grad():
        after = shot_loss(torch.Generator().manual_seed(1234)).item()
    synthetic_labels = torch.arange(k).repeat(per_class)
    with lorakit.route(unet, per_row(synthetic_labels)):
        synthetic = diffusion.sample(predict(synthetic_labels), (len(synthetic_labels), 3, size, size), sample_steps,
                                     gen)

    train_images, train_labels = torch.cat([synthetic, shots]), torch.cat([synthetic_labels, shot_labels])
    datadream = train_classifier(train_images, train_labels, test, test_labels, clf_steps, args.seed)
    few_shot = train_classifier(shots, shot_labels, test, test_labels, clf_steps, args.seed)
    return report(f"DataDream: {args.shots} real shots per class, {per_class} synthetic per class", {
        "shot_loss_before": before, "shot_loss_after": after, "synthetic_images": len(synthetic),
        "accuracy_few_shot_only": few_shot, "accuracy_datadream": datadream, "chance": 1 / k})


if __name__ == "__main__":
    main()
