"""HiVG (METHODS.md entry 97): visual grounding on CLIP with a multi-layer adaptive cross-modal bridge and
hierarchical LoRA (Hi LoRA) trained stage by stage from shallow to deep vision layers.

A CLIP model (transformers ``CLIPModel``) encodes the image and the query ("find the <colour> square"). The bridge
takes the patch tokens of several vision layers ``H_l`` and mixes them with weights conditioned on the text,

    w = softmax(W_w t),   F = sum_l w_l LN(H_l),   F' = F (1 + W_g t) + W_b t        (t: the pooled text feature)

then attends over the patches with a text query, ``a = softmax(F' W_q t / sqrt(d))``, and predicts the box: centre
``sum_i a_i c_i`` (soft-argmax over patch centres) plus a small offset, size from the attended feature. Hi LoRA:
LoRA on every vision layer's attention and MLP, trained in stages with ``lorakit.schedules.StagedLayers``: stage k
trains only the adapters of its layer range, earlier stages stay in the forward but frozen (so later stages adapt on
top of already-adapted shallow features instead of all layers drifting at once). The bridge is trained throughout,
saved with the adapter (``modules_to_save=["bridge"]``). CLIP is pre-trained briefly (contrastive, one square per
image). Printed: accuracy (predicted centre inside the box) and IoU of the bridge alone, of Hi LoRA and of LoRA on
all layers at once; that no step changed adapters outside its stage; the first stage's effect at the end.

Simplified: a tiny random CLIP on 16x16 / 32x32 synthetic images with five colour words (no tokenizer), minutes of CPU
training; the staged mechanism, not the paper's RefCOCO results.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

import lorakit
from lorakit.hooks import HookList, TrainingHook
from lorakit.inject import hosts
from lorakit.schedules import StagedLayers

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.2, 0.3, 1.0], [1.0, 1.0, 0.1], [0.9, 0.2, 1.0]])
BOS, FIND, THE, SQUARE, EOS, FIRST_COLOUR = 10, 1, 2, 3, 11, 4  # word ids; colour c is FIRST_COLOUR + c
LAYERS = "clip.vision_model.encoder.layers"


class Bridge(nn.Module):
    """Text-conditioned mixture of vision layers, text modulation, text-queried attention pooling, box head."""

    def __init__(self, dv: int, dt: int, n_layers: int, grid: int) -> None:
        super().__init__()
        self.layer_weights, self.film = nn.Linear(dt, n_layers), nn.Linear(dt, 2 * dv)
        self.norm, self.query = nn.LayerNorm(dv), nn.Linear(dt, dv)
        self.offset, self.size = nn.Linear(dv, 2), nn.Sequential(nn.Linear(dv, dv), nn.GELU(), nn.Linear(dv, 2))
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        self.register_buffer("centres", (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) / grid)

    def forward(self, layers: list[Tensor], text: Tensor) -> Tensor:  # layers: (B, 1 + N, dv) each; text (B, dt)
        w = self.layer_weights(text).softmax(-1)  # (B, L)
        fused = sum(w[:, i, None, None] * self.norm(h[:, 1:]) for i, h in enumerate(layers))
        gain, shift = self.film(text).chunk(2, -1)
        fused = fused * (1 + gain[:, None]) + shift[:, None]
        attn = (fused @ self.query(text)[:, :, None]).squeeze(-1).div(fused.shape[-1] ** 0.5).softmax(-1)  # (B, N)
        pooled = (attn[:, :, None] * fused).sum(1)
        centre = attn @ self.centres + 0.1 * torch.tanh(self.offset(pooled))
        return torch.cat([centre, self.size(pooled).sigmoid()], -1)  # (cx, cy, w, h)


class Grounder(nn.Module):
    def __init__(self, clip: CLIPModel, layers: list[int], grid: int) -> None:
        super().__init__()
        self.clip, self.layers = clip, layers
        self.bridge = Bridge(clip.config.vision_config.hidden_size, clip.config.text_config.hidden_size,
                             len(layers), grid)

    def forward(self, pixels: Tensor, ids: Tensor) -> Tensor:
        hidden = self.clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        text = self.clip.text_model(input_ids=ids).pooler_output
        return self.bridge([hidden[i] for i in self.layers], text)


def scenes(n: int, size: int, squares: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images with ``squares`` squares of distinct colours on noise; the query names the first. Returns images,
    query ids ``(n, 6)``, the named colour and its box (cx, cy, w, h as fractions of ``size``)."""
    images = 0.2 * torch.rand(n, 3, size, size, generator=gen)
    colours = torch.stack([torch.randperm(len(COLOURS), generator=gen)[:squares] for _ in range(n)])
    side = torch.randint(size // 5, size // 3 + 1, (n, squares), generator=gen)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        for k in reversed(range(squares)):  # the named square is drawn last (on top)
            s = int(side[i, k])
            x, y = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=gen))
            images[i, :, y:y + s, x:x + s] = COLOURS[colours[i, k]][:, None, None]
        boxes[i] = torch.tensor([x + s / 2, y + s / 2, s, s]) / size
    ids = torch.tensor([[BOS, FIND, THE, FIRST_COLOUR + int(c), SQUARE, EOS] for c in colours[:, 0]])
    return images, ids, colours[:, 0], boxes


def tiny_clip(size: int, depth: int, width: int) -> CLIPModel:
    text = dict(vocab_size=12, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=8, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    vision = dict(image_size=size, patch_size=4, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=depth, num_attention_heads=2)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))


def train(model: nn.Module, loss_of, steps: int, hooks: HookList, lr: float = 3e-3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks.on_train_begin(model, optimizer)
    model.train()
    for step in range(steps):
        hooks.before_forward(model, step)
        loss_of(step).backward()
        optimizer.step(), optimizer.zero_grad()
        hooks.after_step(model, optimizer, step + 1)
    model.eval()


def box_loss(pred: Tensor, boxes: Tensor) -> Tensor:
    return F.l1_loss(pred, boxes) + (1 - iou(pred, boxes)).mean()


def iou(a: Tensor, b: Tensor) -> Tensor:
    lo = torch.maximum(a[:, :2] - a[:, 2:] / 2, b[:, :2] - b[:, 2:] / 2)
    hi = torch.minimum(a[:, :2] + a[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
    inter = (hi - lo).clamp(min=0).prod(1)
    return inter / (a[:, 2:].prod(1) + b[:, 2:].prod(1) - inter)


@torch.no_grad()
def evaluate(model: nn.Module, test: tuple[Tensor, ...]) -> tuple[float, float]:
    """(accuracy: predicted centre inside the box, mean IoU)."""
    pred, boxes = model(test[0], test[1]), test[3]
    inside = ((pred[:, :2] - boxes[:, :2]).abs() <= boxes[:, 2:] / 2).all(1)
    return float(inside.float().mean()), float(iou(pred, boxes).mean())


class StageAudit(TrainingHook):
    """Counts the steps that changed an adapter tensor of a block outside the current stage (``violations``) and
    those that changed the current stage's (``trained``)."""

    def __init__(self, staged: StagedLayers, blocks: list[dict[str, Tensor]]) -> None:
        self.staged, self.blocks, self.violations, self.trained = staged, blocks, 0, 0

    def before_forward(self, model: nn.Module, step: int) -> None:
        self.step, self.before = step, [{k: p.detach().clone() for k, p in b.items()} for b in self.blocks]

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        stage = self.staged.stages[self.staged.current(self.step)][1]
        changed = {i for i, b in enumerate(self.blocks) if any(not torch.equal(p, self.before[i][k])
                                                               for k, p in b.items())}
        self.violations += bool(changed - set(stage))
        self.trained += changed >= set(stage)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and budget, seconds on one CPU thread")
    args = parser.parse_args(argv)
    size, depth, width, n = (16, 2, 16, 64) if args.smoke else (32, 6, 32, 1024)
    pre_steps, stage_steps = (15, 10) if args.smoke else (400, 250)
    grid, per_stage = size // 4, 1 if args.smoke else 2
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    pick = torch.Generator().manual_seed(1)
    single = scenes(n, size, 1, gen)
    data, test = scenes(n, size, 3, gen), scenes(128, size, 3, gen)

    clip = tiny_clip(size, depth, width)
    same = (single[2][:, None] == single[2][None]).float()

    def contrastive(_: int) -> Tensor:  # soft targets: every image of the named colour is a match
        idx = torch.randint(0, n, (32,), generator=pick)
        logits = clip(input_ids=single[1][idx], pixel_values=single[0][idx]).logits_per_image
        target = same[idx][:, idx]
        return F.cross_entropy(logits, target / target.sum(1, keepdim=True))

    train(clip, contrastive, pre_steps, HookList(), lr=1e-3)  # gently: a fast one wipes out locality
    pretrained = {k: v.clone() for k, v in clip.state_dict().items()}
    layers = list(range(1, depth + 1))  # the bridge mixes every vision layer's output
    stages = [(k * stage_steps, range(k * per_stage, (k + 1) * per_stage)) for k in range(depth // per_stage)]
    steps = stages[-1][0] + stage_steps
    targets = r"clip\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"

    def run(kind: str) -> tuple[Grounder, list[TrainingHook]]:
        torch.manual_seed(1)
        clip.load_state_dict(pretrained)
        model = Grounder(clip, layers, grid)
        hooks: list[TrainingHook] = []
        if kind == "bridge":
            model.requires_grad_(False)
            model.bridge.requires_grad_(True)
        else:
            lorakit.adapt(model, lorakit.LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=["bridge"]))
        if kind == "staged":
            blocks = [{k: p for k, p in lorakit.trainable_parameters(model).items()
                       if k.startswith(f"{LAYERS}.{i}.")} for i in range(depth)]
            staged = StagedLayers(stages, blocks=LAYERS)
            hooks = [staged, StageAudit(staged, blocks)]

        def loss_of(_: int) -> Tensor:
            idx = torch.randint(0, n, (32,), generator=pick)
            return box_loss(model(data[0][idx], data[1][idx]), data[3][idx])

        train(model, loss_of, steps, HookList(hooks))
        return model, hooks

    results, metrics = {}, {}
    for kind in ("staged",) if args.smoke else ("bridge", "staged", "all_at_once"):  # smoke: the staged run only
        model, hooks = run(kind)
        results[kind] = evaluate(model, test)
        if kind == "staged":
            with torch.no_grad():
                full = model(test[0], test[1])
                for host in hosts(model):  # leave the first stage's adapters out of the forward
                    if host.path.startswith(tuple(f"{LAYERS}.{i}." for i in stages[0][1])):
                        host.active = ()
                results["staged_without_first_stage"] = evaluate(model, test)
                reduced = model(test[0], test[1])
            metrics = {"steps_outside_stage": float(hooks[1].violations), "steps": float(steps),
                       "steps_training_stage": float(hooks[1].trained),
                       "first_stage_effect": float((full - reduced).abs().max())}
        if kind != "bridge":
            lorakit.unload(model)
    for kind, (acc, mean_iou) in results.items():
        print(f"{kind:>26}: accuracy {acc:.3f}, IoU {mean_iou:.3f}")
        metrics.update({f"{kind}_acc": acc, f"{kind}_iou": mean_iou})
    print(f"stages {[(s, f'layers {r.start}-{r.stop - 1}') for s, r in stages]}: steps that changed adapters outside "
          f"their stage: {metrics['steps_outside_stage']:.0f}; the first stage's (frozen) adapters still move the "
          f"boxes by up to {metrics['first_stage_effect']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
