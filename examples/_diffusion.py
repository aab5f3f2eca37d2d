"""Shared pieces of the six diffusion application examples (Scale-DiT, OSDiffST, AuthenLoRA, LoRA-Enhanced
Distillation, DataDream, EasyRef).

Everything is built here, nothing is downloaded: synthetic images of coloured shapes and textures drawn in code, a
frozen random "prompt encoder", tiny randomly initialised diffusers UNets, the DDPM forward process and noise-prediction
loss (diffusers' ``DDPMScheduler``), a few-step DDIM sampler (``DDIMScheduler``) and a small Adam loop.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPConfig

SHAPES = ("disc", "square", "ring", "cross", "stripes", "checker")
COLOURS = {  # RGB in [-1, 1]
    "red": (0.9, -0.8, -0.8), "green": (-0.8, 0.8, -0.8), "blue": (-0.8, -0.6, 0.9),
    "yellow": (0.9, 0.8, -0.8), "magenta": (0.8, -0.8, 0.8), "cyan": (-0.8, 0.8, 0.8),
}

Predict = Callable[[Tensor, Tensor], Tensor]
"""A noise predictor ``(x_t, t) -> eps`` (a model with its condition bound)."""


def _mask(shape: str, yy: Tensor, xx: Tensor, cy: float, cx: float, r: float, turn: float) -> Tensor:
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        return dy ** 2 + dx ** 2 < r ** 2
    if shape == "square":
        return torch.maximum(dy.abs(), dx.abs()) < 0.85 * r
    if shape == "ring":
        return ((dy ** 2 + dx ** 2).sqrt() - 0.75 * r).abs() < 0.3 * r
    if shape == "cross":
        return ((dy.abs() < 0.3 * r) & (dx.abs() < r)) | ((dx.abs() < 0.3 * r) & (dy.abs() < r))
    if shape == "stripes":
        return torch.sin(6.0 * (xx * torch.cos(torch.tensor(turn)) + yy * torch.sin(torch.tensor(turn)))) > 0
    if shape == "checker":
        return (torch.floor(2.0 * (xx + 2 + cx)) + torch.floor(2.0 * (yy + 2 + cy))) % 2 == 0
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def draw(shapes: Sequence[str], colours: Tensor, size: int, generator: torch.Generator,
         background: Tensor | None = None, noise: float = 0.0) -> Tensor:
    """``(n, 3, size, size)`` images in ``[-1, 1]``: ``shapes[i]`` painted in ``colours[i]`` (``(n, 3)``) at a random
    position, scale and angle on ``background`` (``(3,)`` or ``(n, 3)``; default black), plus Gaussian pixel noise."""
    if size < 4:
        raise ValueError(f"size must be >= 4 pixels, got {size}")
    if colours.shape != (len(shapes), 3):
        raise ValueError(f"colours must have shape ({len(shapes)}, 3), got {tuple(colours.shape)}")
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    jitter = torch.rand(len(shapes), 4, generator=generator)
    back = torch.full((len(shapes), 3), -1.0) if background is None else background.expand(len(shapes), 3)
    out = []
    for i, shape in enumerate(shapes):
        cy, cx, r, turn = (0.6 * jitter[i, :2] - 0.3).tolist() + [0.4 + 0.3 * jitter[i, 2].item(), jitter[i, 3].item()]
        mask = _mask(shape, yy, xx, cy, cx, r, turn)
        out.append(torch.where(mask, colours[i, :, None, None], back[i, :, None, None]))
    images = torch.stack(out)
    return (images + noise * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def colours_of(names: Sequence[str]) -> Tensor:
    """The ``(n, 3)`` RGB values of colour names from :data:`COLOURS`."""
    unknown = [n for n in names if n not in COLOURS]
    if unknown:
        raise ValueError(f"unknown colours {unknown}; known: {list(COLOURS)}")
    return torch.tensor([COLOURS[n] for n in names])


class Prompts(nn.Module):
    """A frozen random stand-in for a text encoder: prompt id ``k`` -> ``length`` fixed tokens of width ``dim``
    (id 0 is the empty prompt, used for classifier-free guidance)."""

    def __init__(self, count: int, dim: int, length: int = 2, seed: int = 0) -> None:
        super().__init__()
        if count < 1 or dim < 1 or length < 1:
            raise ValueError(f"count, dim and length must be >= 1, got {count}, {dim}, {length}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(count + 1, length, dim, generator=gen))

    def forward(self, ids: Tensor) -> Tensor:
        """``(B,)`` prompt ids -> ``(B, length, dim)`` encoder states."""
        return self.table[ids]


def tiny_unet(smoke: bool, cross_dim: int, channels: int = 3, seed: int = 0) -> UNet2DConditionModel:
    """A random ``UNet2DConditionModel`` with one cross-attention level: block widths (16, 32) and no middle block in
    smoke mode, else (32, 64) and a cross-attention middle block."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8 if smoke else 16, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32) if smoke else (32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim, attention_head_dim=8,
        norm_num_groups=8, mid_block_type=None if smoke else "UNetMidBlock2DCrossAttn")


def clip_config(size: int, width: int = 32, vocab: int = 16) -> CLIPConfig:
    """A tiny CLIP: 2-layer vision (4x4 patches of ``size x size`` images) and text (``vocab`` tokens, the last one
    the end-of-text token) towers of width ``width``."""
    tower = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {"vocab_size": vocab, "max_position_embeddings": 8, "bos_token_id": 0, "pad_token_id": 0,
            "eos_token_id": vocab - 1, **tower}
    return CLIPConfig(vision_config={"image_size": size, "patch_size": 4, **tower}, text_config=text,
                      projection_dim=width)


class Diffusion:
    """The DDPM forward process, noise-prediction loss and a DDIM sampler on diffusers' schedulers."""

    def __init__(self, steps: int = 1000) -> None:
        self.ddpm = DDPMScheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2")
        self.steps = steps

    def noised(self, x0: Tensor, generator: torch.Generator, t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, t, eps)``: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, ``t`` given or ``~ U[0, T)`` per image."""
        if t is None:
            t = torch.randint(0, self.steps, (x0.shape[0],), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        return self.ddpm.add_noise(x0, eps, t), t, eps

    def x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The one-step clean-image estimate ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``."""
        a = self.ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def loss(self, predict: Predict, x0: Tensor, generator: torch.Generator) -> Tensor:
        """``E ||eps - predict(x_t, t)||^2`` on one draw of ``t`` and ``eps``."""
        x_t, t, eps = self.noised(x0, generator)
        return (predict(x_t, t) - eps).pow(2).mean()

    @torch.no_grad()
    def sample(self, predict: Predict, shape: tuple[int, ...], steps: int, generator: torch.Generator) -> Tensor:
        """Deterministic DDIM sampling from ``N(0, I)`` in ``steps`` steps."""
        ddim = DDIMScheduler.from_config(self.ddpm.config)
        ddim.set_timesteps(steps)
        x = torch.randn(shape, generator=generator)
        for t in ddim.timesteps:
            x = ddim.step(predict(x, t.expand(shape[0])), t, x).prev_sample
        return x.clamp(-1, 1)


def fit(params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], loss: Callable[[int], Tensor], steps: int,
        lr: float) -> list[float]:
    """``steps`` Adam steps on ``loss(step)`` over ``params`` (tensors, or Adam parameter groups with their own
    ``lr``); the losses seen."""
    params = list(params)
    if not params:
        raise ValueError("fit needs at least one trainable parameter")
    optimizer = torch.optim.Adam(params, lr=lr, foreach=True)
    seen = []
    for step in range(steps):
        value = loss(step)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        seen.append(value.item())
    return seen


def pick(count: int, batch: int, generator: torch.Generator) -> Tensor:
    """``batch`` random indices into ``count`` items."""
    return torch.randint(0, count, (batch,), generator=generator)


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """The best wall time of ``fn()`` over ``repeats`` runs, in milliseconds (after one warm-up run)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def report(title: str, metrics: dict[str, float]) -> dict[str, float]:
    """Print ``metrics`` under ``title`` and return them."""
    print(title)
    for key, value in metrics.items():
        print(f"  {key:<34} {value:.4g}")
    return metrics


def at_least(low: float, kind: type = float):
    """An argparse ``type`` reading a ``kind`` that must be ``>= low`` (a clear usage error otherwise)."""
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def example_parser(doc: str) -> argparse.ArgumentParser:
    """The options every example takes: ``--smoke`` (tiny sizes, CI) and ``--seed``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    return parser
