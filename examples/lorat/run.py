"""LoRAT (METHODS.md entry 95, "Tracking Meets LoRA"): a ViT tracker tuned with LoRA, its new token-type embeddings
and MLP head trained from scratch and saved with the adapter (``modules_to_save``).

The tracker feeds template tokens (a crop around the target in the first frame) and search tokens (the next frame)
through one ViT backbone. Position embeddings are decoupled as in the paper: the *spatial* embeddings are the
backbone's own, shared by both images (the template's are the search grid's resized to the template grid: absolute
coordinates at another resolution), and new *token-type* embeddings (template / search) are learned from scratch:

    z = PatchEmbed(template) + resize(P) + E_type[0],     x = PatchEmbed(search) + P + E_type[1]

An anchor-free MLP head maps each search token to a centre score and a box (offset of the centre within the token's
cell, width, height). The backbone is pre-trained briefly on single frames (a linear probe finds the square), then
the tracker trains LoRA on the backbone's attention and MLP layers with ``modules_to_save=["type_embed", "head"]``:
the embeddings and the head get a fully trained copy that ``save_adapter`` writes with the LoRA tensors (PEFT's keys)
and ``load_adapter`` restores into a tracker whose own head and embeddings are freshly (differently) initialised.
Printed: IoU before / after, what was saved, and the reloaded tracker's difference from the trained one.

Simplified: synthetic moving-square sequences (the target among distractors of other colours on noise) of two frames,
a tiny ViT, a few hundred CPU steps; the mechanism, not the paper's LaSOT numbers or speed.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

import lorakit

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.2, 0.3, 1.0], [1.0, 1.0, 0.1], [0.9, 0.2, 1.0]])


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding, spatial position embeddings of the search grid, pre-norm blocks."""

    def __init__(self, grid: int, patch: int, dim: int, depth: int) -> None:
        super().__init__()
        self.grid = grid
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, 2) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def tokens(self, image: Tensor) -> Tensor:
        """Patch tokens plus the spatial embeddings resized to the image's grid (shared across resolutions)."""
        x = self.patch_embed(image)
        pos = self.pos if x.shape[-1] == self.grid else F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear")
        return (x + pos).flatten(2).transpose(1, 2)

    def encode(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Tracker(nn.Module):
    """Template + search tokens through the backbone; token-type embeddings; an anchor-free MLP head."""

    def __init__(self, backbone: ViT, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.type_embed = nn.Embedding(2, dim)  # 0: template, 1: search; learned from scratch
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 5))  # score, dx, dy, w, h

    def forward(self, template: Tensor, search: Tensor) -> Tensor:
        kinds = self.type_embed(torch.arange(2))
        z = self.backbone.tokens(template) + kinds[0]
        x = self.backbone.tokens(search) + kinds[1]
        out = self.backbone.encode(torch.cat([z, x], dim=1))[:, z.shape[1]:]
        return self.head(out)  # (B, grid^2, 5)


def frames(n: int, size: int, crop: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Two-frame sequences: templates ``(n, 3, crop, crop)`` around the target in frame 0, search frames 1
    ``(n, 3, size, size)`` where it (and two distractors of other colours) moved, and its boxes there ``(n, 4)``
    (cx, cy, w, h as fractions of ``size``)."""
    def draw(image: Tensor, colour: Tensor, x0: Tensor, y0: Tensor, side: Tensor) -> None:
        for i in range(len(image)):
            image[i, :, y0[i]:y0[i] + side[i], x0[i]:x0[i] + side[i]] = colour[i][:, None, None]

    colours = torch.stack([torch.randperm(len(COLOURS), generator=gen)[:3] for _ in range(n)])  # target, 2 others
    side = torch.randint(size // 6, size // 4 + 1, (n,), generator=gen)
    first = torch.stack([torch.randint(0, size - s + 1, (2, 3), generator=gen) for s in side.tolist()])
    step = torch.randint(-size // 8, size // 8 + 1, first.shape, generator=gen)
    second = torch.minimum(torch.clamp(first + step, min=0), (size - side)[:, None, None])
    images = 0.25 * torch.rand(2, n, 3, size, size, generator=gen)
    for t, pos in enumerate((first, second)):
        for k in (1, 2, 0):  # the target drawn last: on top
            draw(images[t], COLOURS[colours[:, k]], pos[:, 0, k], pos[:, 1, k], side)
    centre = first[:, :, 0] + side[:, None] // 2
    padded = F.pad(images[0], (crop, crop, crop, crop))
    templates = torch.stack([padded[i, :, cy + crop - crop // 2:cy + crop + crop // 2, cx + crop - crop // 2:
                                    cx + crop + crop // 2] for i, (cx, cy) in enumerate(centre.tolist())])
    boxes = torch.cat([second[:, :, 0] + side[:, None] / 2, side[:, None].expand(n, 2)], 1).float() / size
    return templates, images[1], boxes


def loss_of(pred: Tensor, boxes: Tensor, grid: int) -> Tensor:
    """Focal-free anchor-free loss: cross-entropy of the centre cell over the grid + L1 of its box."""
    cell = (boxes[:, :2] * grid).clamp(max=grid - 1e-4)
    index = cell[:, 1].long() * grid + cell[:, 0].long()
    at = pred[torch.arange(len(pred)), index]
    target = torch.cat([cell - cell.floor(), boxes[:, 2:]], 1)
    return F.cross_entropy(pred[..., 0], index) + 5 * F.l1_loss(at[:, 1:].sigmoid(), target)


@torch.no_grad()
def predict(model: nn.Module, template: Tensor, search: Tensor, grid: int) -> Tensor:
    """Boxes (cx, cy, w, h) from the best-scoring cell."""
    pred = model(template, search)
    index = pred[..., 0].argmax(1)
    at = pred[torch.arange(len(pred)), index, 1:].sigmoid()
    cell = torch.stack([index % grid, index // grid], 1).float()
    return torch.cat([(cell + at[:, :2]) / grid, at[:, 2:]], 1)


def iou(a: Tensor, b: Tensor) -> float:
    lo, hi = torch.maximum(a[:, :2] - a[:, 2:] / 2, b[:, :2] - b[:, 2:] / 2), torch.minimum(
        a[:, :2] + a[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
    inter = (hi - lo).clamp(min=0).prod(1)
    return float((inter / (a[:, 2:].prod(1) + b[:, 2:].prod(1) - inter)).mean())


def train(model: nn.Module, params: list[Tensor], data_of, steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        data_of(step).backward()
        optimizer.step(), optimizer.zero_grad()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and budget, seconds on one CPU thread")
    args = parser.parse_args(argv)
    size, dim, depth, pre_steps, steps, n = (16, 16, 1, 40, 60, 64) if args.smoke else (32, 48, 3, 600, 1500, 512)
    patch, batch = 4, 32
    grid, crop = size // patch, size // 2
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    templates, searches, boxes = frames(n, size, crop, gen)
    test = frames(128, size, crop, gen)
    pick = torch.Generator().manual_seed(1)

    backbone = ViT(grid, patch, dim, depth)
    probe = nn.Linear(dim, 1)  # pre-training: which cell holds a square's centre (single frames, any square)

    def pretrain_loss(_: int) -> Tensor:
        idx = torch.randint(0, n, (batch,), generator=pick)
        scores = probe(backbone.encode(backbone.tokens(searches[idx])))[..., 0]
        return loss_of(torch.stack([scores] * 5, -1), boxes[idx], grid)

    train(backbone, [*backbone.parameters(), *probe.parameters()], pretrain_loss, pre_steps, 3e-3)
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    tracker = Tracker(backbone, dim).eval()
    before = iou(predict(tracker, *test[:2], grid), test[2])
    total = sum(p.numel() for p in tracker.parameters())
    lorakit.adapt(tracker, lorakit.LoraConfig(r=4, alpha=8, targets=["qkv", "proj", "fc1", "fc2"],
                                              modules_to_save=["type_embed", "head"]))
    trained = lorakit.trainable_parameters(tracker)

    def tracking_loss(_: int) -> Tensor:
        idx = torch.randint(0, n, (batch,), generator=pick)
        return loss_of(tracker(templates[idx], searches[idx]), boxes[idx], grid)

    train(tracker, list(trained.values()), tracking_loss, steps, 3e-3)
    expected = predict(tracker, *test[:2], grid)
    after = iou(expected, test[2])
    wrong = iou(predict(tracker, test[0].roll(1, 0), test[1], grid), test[2])  # another sequence's template
    head = tracker.head
    moved = float((head.modules_to_save["default"][0].weight - head.original_module[0].weight).detach().norm())

    with tempfile.TemporaryDirectory() as folder:
        lorakit.save_adapter(tracker, folder)
        keys = list(load_file(Path(folder) / "adapter_model.safetensors"))
        torch.manual_seed(123)  # a fresh tracker: same pre-trained backbone, differently initialised head/embeddings
        fresh = ViT(grid, patch, dim, depth)
        fresh.load_state_dict(pretrained)
        reloaded = lorakit.load_adapter(Tracker(fresh, dim).eval(), folder)
    saved = sorted({k.removeprefix("base_model.model.") for k in keys if ".lora_" not in k})
    diff = float((predict(reloaded, *test[:2], grid) - expected).abs().max())
    share = sum(p.numel() for p in trained.values()) / total
    print(f"tracker IoU on held-out sequences: {before:.3f} before training -> {after:.3f} after "
          f"(LoRA r=4 + head + type embeddings: {100 * share:.1f}% of the parameters trained); "
          f"{wrong:.3f} given another sequence's template")
    print(f"head copy moved {moved:.2f} from its random init; saved with the LoRA tensors: {saved}")
    print(f"reloaded into a tracker with a different random head: largest box difference {diff:.2e}")
    return {"iou_before": before, "iou_after": after, "iou_wrong_template": wrong, "trainable_pct": 100 * share,
            "head_moved": moved, "saved_module_tensors": float(len(saved)), "reload_max_diff": diff,
            "lora_tensors": float(sum(".lora_" in k for k in keys))}


if __name__ == "__main__":
    main()
