"""CMLoRA -- *Cached Multi-LoRA Composition for Multi-Concept Image Generation* (Zou et al., 2025).

    scores = frequency_scores(unet, names, probe, t, states)     # share of high-frequency energy of each LoRA's effect
    order = frequency_order(names, scores)                       # frequency-domain sequencing
    timesteps, step = ddim(30)
    out = cmlora_sample(unet, order, latents, states, timesteps, step, intervals=[1, 2, 3])

The abstract leaves the fusion and the schedules open; what this module assumes:

* Fusion (Eq. F, LoRA Composite's average): ``eps_t = (1/n) sum_i eps_i(z_t)``, ``eps_i`` the UNet with LoRA ``i``
  alone. It equals ``eps_base + (1/n) sum_i (eps_i - eps_base)`` without a base pass, so a step costs at most ``n``
  UNet passes, and one LoRA gives exactly its own sample.
* Frequency score (Eq. S): ``s_i = ||P_high F(d_i)||^2 / ||F(d_i)||^2`` with ``d_i = eps_i - eps_base`` on a probe
  latent, ``F`` the 2-D FFT over height and width and ``P_high`` keeping frequencies of radius ``> cutoff`` (cycles
  per latent pixel; Nyquist is 0.5).
* Sequencing: descending scores (high-frequency LoRAs lead), ties in the given order; ``high_first=False`` reverses.
* Caching (Eq. C): at step ``k`` the dominant LoRA is ``order[(k // switch_every) mod n]`` (LoRA Switch's rotation)
  and is always recomputed; any other LoRA ``i`` is recomputed when it has no cached ``eps_i`` yet or its cache is
  ``intervals[i]`` or more steps old, and reused otherwise. All intervals 1 is the uncached composition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import require
from ..inject import configs, disable
from ..mixing import mix

Step = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``step(eps, t, latents) -> next latents``: one sampler update, e.g. a diffusers scheduler's ``step``."""


@dataclass(frozen=True)
class CachedSample:
    """What :func:`cmlora_sample` returns: the final latents and the UNet passes made at each step."""

    latents: Tensor
    evaluations: list[int]


def ddim(steps: int, train_steps: int = 1000) -> tuple[Tensor, Step]:
    """Timesteps and step function of a deterministic (eta = 0) diffusers ``DDIMScheduler`` with ``steps`` steps,
    built from its default config (no download)."""
    from diffusers import DDIMScheduler

    require(isinstance(steps, int) and 1 <= steps <= train_steps, "steps", steps,
            f"must be an integer in [1, {train_steps}]")
    scheduler = DDIMScheduler(num_train_timesteps=train_steps)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps, lambda eps, t, latents: scheduler.step(eps, t, latents).prev_sample


def check_loras(unet: nn.Module, names: Sequence[str]) -> None:
    """Refuse an empty list, repeated names, or names that are not adapters of ``unet``."""
    require(len(names) > 0, "names", list(names), "must name at least one LoRA")
    require(len(set(names)) == len(names), "names", list(names), "must be distinct")
    known = sorted(configs(unet))
    for name in names:
        require(name in known, "names", name, f"must be an adapter of this UNet; it has: {known or 'none'}")


def lora_noise(unet: nn.Module, name: str | None, latents: Tensor, t: Tensor | int, states: Tensor) -> Tensor:
    """``eps_name(z_t)``: the UNet's noise prediction with LoRA ``name`` alone (``None``: the base model)."""
    if name is None:
        with disable(unet):
            return unet(latents, t, encoder_hidden_states=states).sample
    with mix(unet, [name], torch.ones(1, device=latents.device)):
        return unet(latents, t, encoder_hidden_states=states).sample


def high_frequency_share(delta: Tensor, cutoff: float = 0.25) -> Tensor:
    """Eq. S: the share of ``delta``'s spectral energy (2-D FFT over its last two axes) at radius ``> cutoff``."""
    require(0 < cutoff < 0.5, "cutoff", cutoff, "must be in (0, 0.5) cycles per pixel")
    energy = torch.fft.fft2(delta.float()).abs().square()
    fy = torch.fft.fftfreq(delta.shape[-2], device=delta.device)
    fx = torch.fft.fftfreq(delta.shape[-1], device=delta.device)
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > cutoff
    total = energy.sum()
    return (energy * high).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def frequency_scores(unet: nn.Module, names: Sequence[str], latents: Tensor, t: Tensor | int, states: Tensor,
                     cutoff: float = 0.25) -> Tensor:
    """``(n,)`` Eq. S scores of each LoRA's effect ``eps_i - eps_base`` on the probe ``latents`` at ``t``
    (``n + 1`` UNet passes)."""
    check_loras(unet, names)
    with torch.no_grad():
        base = lora_noise(unet, None, latents, t, states)
        return torch.stack([high_frequency_share(lora_noise(unet, n, latents, t, states) - base, cutoff)
                            for n in names])


def frequency_order(names: Sequence[str], scores: Tensor, high_first: bool = True) -> list[str]:
    """Frequency-domain sequencing: ``names`` by descending ``scores`` (ascending if not ``high_first``); a stable
    sort, so equal scores keep the given order."""
    require(scores.shape == (len(names),), "scores", tuple(scores.shape), f"must be ({len(names)},): one per name")
    keys = (-scores if high_first else scores).tolist()
    return [names[i] for i in sorted(range(len(names)), key=keys.__getitem__)]


def cache_plan(order: Sequence[str], intervals: Sequence[int], steps: int, switch_every: int = 1) -> list[list[str]]:
    """Eq. C: the LoRAs whose ``eps_i`` is recomputed at each of ``steps`` steps (the others reuse their cache)."""
    require(len(order) > 0, "order", list(order), "must name at least one LoRA")
    require(len(intervals) == len(order), "intervals", list(intervals), f"must hold one interval per LoRA "
            f"({len(order)})")
    require(all(isinstance(i, int) and i >= 1 for i in intervals), "intervals", list(intervals),
            "must be integers >= 1 (1: recompute every step)")
    require(isinstance(switch_every, int) and switch_every >= 1, "switch_every", switch_every,
            "must be an integer >= 1")
    require(isinstance(steps, int) and steps >= 0, "steps", steps, "must be an integer >= 0")
    last: dict[str, int] = {}
    plan = []
    for k in range(steps):
        dominant = order[(k // switch_every) % len(order)]
        due = [n for n, every in zip(order, intervals) if n == dominant or n not in last or k - last[n] >= every]
        last.update(dict.fromkeys(due, k))
        plan.append(due)
    return plan


def cmlora_sample(unet: nn.Module, order: Sequence[str], latents: Tensor, states: Tensor,
                  timesteps: Sequence[int] | Tensor, step: Step, intervals: Sequence[int],
                  switch_every: int = 1) -> CachedSample:
    """Sample with CMLoRA: at each step refresh the LoRAs :func:`cache_plan` names, fuse by Eq. F, take ``step``.

    ``order`` is the sequence of LoRAs (e.g. :func:`frequency_order`'s) and ``intervals[i]`` the cache interval of
    ``order[i]``.
    """
    check_loras(unet, order)
    plan = cache_plan(order, intervals, len(timesteps), switch_every)
    cache: dict[str, Tensor] = {}
    with torch.no_grad():
        for t, due in zip(timesteps, plan):
            cache.update({n: lora_noise(unet, n, latents, t, states) for n in due})
            latents = step(torch.stack([cache[n] for n in order]).mean(0), t, latents)
    return CachedSample(latents, [len(due) for due in plan])
