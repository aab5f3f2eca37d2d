"""EVA, an embodied world model (METHODS.md entry 99): one LoRA per video-prediction meta-task, combined by an
adaptively weighted multi-adapter sum.

EVA splits future-video anticipation into meta-tasks and "adaptively ensembles" LoRAs. Here: a tiny video
predictor (each 8x8 frame a token: linear embedding, a causal Llama over the frames, linear read-out of the next
frame) is pre-trained on near-static videos; four task adapters are trained, one per meta-task (a blob that
*moves*, *grows*, *fades* or a bar that *rotates*); then the adapters are ensembled as

    h = W0 x + sum_i w_i B_i A_i x                      (``lorakit.mix(model, names, w)``)

with ``w`` fitted by gradient descent on a small validation set drawn from all four meta-tasks, and finally merged
into one adapter (``lorakit.merging.merge_adapters(..., rule="cat")``, exact). Reported: the next-frame MSE of
every single adapter on every meta-task, of the ensemble, and on an unseen composite task (a blob that moves and
fades). Simplified: synthetic 8-frame Gaussian-blob videos, a random-weight 2-layer Llama, no VLM and no diffusion
generator.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaModel

import lorakit
from lorakit.merging.model import merge_adapters

SIDE, FRAMES = 8, 8
TASKS = ("move", "grow", "fade", "rotate")


def videos(task: str, n: int, gen: torch.Generator) -> Tensor:
    """``(n, FRAMES, 64)``: an anisotropic Gaussian blob whose parameters follow ``task``'s dynamics
    (``"static"``: small random drifts, the pre-training data; ``"move+fade"``: both)."""
    def rand(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, 1, generator=gen)

    t = torch.arange(FRAMES, dtype=torch.float32)
    cx, cy = rand(2, 5) + 0 * t, rand(2, 5) + 0 * t
    sx, sy, angle, amp = rand(0.8, 1.2) + 0 * t, rand(0.8, 1.2) + 0 * t, rand(0, math.pi) + 0 * t, rand(0.7, 1) + 0 * t
    if task == "static":
        cx, cy = cx + rand(-0.1, 0.1) * t, cy + rand(-0.1, 0.1) * t
    if task in ("move", "move+fade"):
        cx, cy = cx + rand(-0.5, 0.5) * t, cy + rand(-0.5, 0.5) * t
    if task == "grow":
        sx = sy = sx + 0.25 * t
    if task in ("fade", "move+fade"):
        amp = amp * 0.8 ** t
    if task == "rotate":
        sx, sy, angle = sx * 2.0, sy * 0.5, angle + math.pi / 8 * t
    yy, xx = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32),
                            indexing="ij")
    dx, dy = xx.flatten() - cx[..., None], yy.flatten() - cy[..., None]  # (n, FRAMES, 64)
    c, s = angle.cos()[..., None], angle.sin()[..., None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    return amp[..., None] * torch.exp(-0.5 * ((u / sx[..., None]) ** 2 + (v / sy[..., None]) ** 2))


class VideoPredictor(nn.Module):
    """Frames as tokens: embed -> causal Llama -> next frame."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(SIDE * SIDE, 48)
        self.backbone = LlamaModel(LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=1,
                                               bos_token_id=None, eos_token_id=None))
        self.read_out = nn.Linear(48, SIDE * SIDE)

    def forward(self, frames: Tensor) -> Tensor:
        return self.read_out(self.backbone(inputs_embeds=self.embed(frames)).last_hidden_state)


def loss_on(model: nn.Module, clips: Tensor) -> Tensor:
    """Mean squared error of each predicted next frame."""
    return F.mse_loss(model(clips[:, :-1]), clips[:, 1:])


def fit(model: nn.Module, params: list[Tensor], task: str, steps: int, gen: torch.Generator, lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = loss_on(model, videos(task, 32, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget, seconds on one CPU thread")
    args = parser.parse_args(argv)
    base_steps, task_steps, weight_steps = (60, 40, 30) if args.smoke else (2000, 1000, 200)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    begin = time.process_time()
    model = VideoPredictor()
    fit(model, list(model.parameters()), "static", base_steps, gen, 3e-3)
    transformer = r"backbone\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
    for task in TASKS:  # one adapter per meta-task
        lorakit.adapt(model, lorakit.LoraConfig(r=8, alpha=16, targets=transformer), task)
        fit(model, list(lorakit.trainable_parameters(model, task).values()), task, task_steps, gen, 3e-3)
    model.requires_grad_(False)

    validation = torch.cat([videos(task, 16, gen) for task in TASKS])  # a small set from every meta-task
    logits = torch.zeros(len(TASKS), requires_grad=True)  # weights w = softplus(logits) / softplus(0)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(weight_steps):
        with lorakit.mix(model, TASKS, F.softplus(logits) / math.log(2)):
            loss = loss_on(model, validation)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = (F.softplus(logits) / math.log(2)).detach()
    merge_adapters(model, TASKS, weights.tolist(), rule="cat", into="ensemble")

    tests = {task: videos(task, 256, gen) for task in (*TASKS, "move+fade")}
    table: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name in (*TASKS, "ensemble"):
            lorakit.set_active(model, name)
            table[name] = {task: loss_on(model, clips).item() for task, clips in tests.items()}
        with lorakit.mix(model, TASKS, weights):
            mixed = model(tests["move+fade"][:, :-1])
        merged = model(tests["move+fade"][:, :-1])  # the active adapter is "ensemble"
        with lorakit.disable(model):
            table["base"] = {task: loss_on(model, clips).item() for task, clips in tests.items()}
    print("ensemble weights:", dict(zip(TASKS, [round(w, 2) for w in weights.tolist()])))
    print(f"next-frame MSE x1000  {'':9}" + "".join(f"{task:>10}" for task in tests) + f"{'mean of 4':>11}")
    for name, row in table.items():
        print(f"{'adapter ' + name if name != 'base' else 'base model':>30}" + "".join(f"{1000 * v:10.2f}" for v in
              row.values()) + f"{1000 * sum(row[t] for t in TASKS) / len(TASKS):11.2f}")
    print(f"merged adapter vs mixed forward: max |diff| {(merged - mixed).abs().max().item():.1e}"
          f"  [{time.process_time() - begin:.1f} s]")
    metrics = {f"{name}_{task}": v for name, row in table.items() for task, v in row.items()}
    metrics.update({f"{name}_mean": sum(row[t] for t in TASKS) / len(TASKS) for name, row in table.items()})
    metrics["merge_vs_mix"] = (merged - mixed).abs().max().item()
    return metrics


if __name__ == "__main__":
    main()
