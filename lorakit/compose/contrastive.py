"""CLoRA -- *CLoRA: A Contrastive Approach to Compose Multiple LoRA Models* (Meral et al., 2024).

LoRA ``i`` comes with concept ``i``: the indices of the prompt tokens that name it. One step (:func:`clora_step`):

1. Maps (Eq. A): each LoRA's UNet pass records its cross-attention probabilities ``softmax(Q K^T * scale)`` (forward
   hooks on each ``attn2``; its processor and output are untouched), averaged over heads and layers and resized
   (bilinear) to the latent's ``(H, W)``: ``A_i[:, t]`` is token ``t``'s map.
2. Update (Eq. U, first ``update_steps`` steps): ``z <- z - step_size * grad_z L`` with ``L`` the contrastive loss
   below on the maps of all LoRA passes (Attend-and-Excite's gradient step).
3. Masks (Eq. M): ``M_i = onehot_i(argmax_c A_c[c] / max A_c[c])`` per latent pixel, ``A_c[c]`` the mean map of
   concept ``c``'s tokens in LoRA ``c``'s own pass, max-normalised so concepts compare: the masks partition the latent.
4. Fusion (Eq. F): ``eps = sum_i M_i * eps_i`` and one sampler step.

Contrastive loss (Eq. L, a supervised InfoNCE): the items are the maps ``A_i[:, t]`` for every pass ``i`` and every
concept token ``t``, flattened and L2-normalised, labelled by their concept. With ``s_ab`` their cosine similarity,
positives ``P(a)`` (the other items of ``a``'s concept, in any pass) and negatives ``N(a)`` (other concepts' items):

    L_a = -1/|P(a)| sum_{p in P(a)} log( exp(s_ap/tau) / (exp(s_ap/tau) + sum_{b in N(a)} exp(s_ab/tau)) )

``L`` is the mean of ``L_a`` over batch rows and anchors with positives and negatives; 0 when there are none (one
LoRA), so a single LoRA's latent is never moved. Assumed where the abstract is silent: maps from raw probabilities
(no start-token removal), masks from each LoRA's own pass, and a fixed ``step_size`` (tune it per model).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import LorakitError, require
from .cached import Step, check_loras, lora_noise


@dataclass(frozen=True)
class ContrastiveStep:
    """What :func:`clora_step` returns: next latents, the ``(n, B, 1, H, W)`` masks and the Eq. L loss before the
    update (0 without one)."""

    latents: Tensor
    masks: Tensor
    loss: Tensor


@contextlib.contextmanager
def capture_cross_attention(unet: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every cross-attention layer of ``unet`` appends its Eq. A probabilities (``(B, pixels,
    tokens)``, mean over heads) to the yielded list. Forward hooks read the layer's own query and key projections,
    so its processor (and output) is untouched; the hooks are removed afterwards, even on error."""
    layers = [m for m in unet.modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "to_k")]
    require(len(layers) > 0, "unet", type(unet).__name__,
            "must have cross-attention layers (diffusers Attention over encoder_hidden_states)")
    store: list[Tensor] = []
    handles = [h for attn in layers for h in _record(attn, store)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _record(attn: nn.Module, store: list[Tensor]) -> list[RemovableHandle]:
    """Hooks keeping ``attn``'s query and key, and appending ``softmax(Q K^T * scale)`` after its forward."""
    seen: dict[str, Tensor] = {}

    def keep(key: str) -> Callable[..., None]:
        return lambda module, args, out: seen.__setitem__(key, out)

    def probabilities(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Tensor) -> None:
        if "q" not in seen or "k" not in seen:
            raise LorakitError("this attention processor does not call the layer's to_q and to_k; CLoRA reads them")
        q, k = seen.pop("q"), seen.pop("k")
        mask = attn.prepare_attention_mask(kwargs.get("attention_mask"), k.shape[1], k.shape[0])
        probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), mask)
        store.append(probs.reshape(q.shape[0], attn.heads, *probs.shape[1:]).mean(1))

    return [attn.to_q.register_forward_hook(keep("q")), attn.to_k.register_forward_hook(keep("k")),
            attn.register_forward_hook(probabilities, with_kwargs=True)]


def attention_maps(records: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Eq. A: ``(B, tokens, H, W)``, the mean over layers of the recorded ``(B, pixels, tokens)`` maps, each resized
    to ``size``."""
    require(len(records) > 0, "records", 0, "must hold at least one recorded cross-attention map")
    return torch.stack([_to_grid(r, size) for r in records]).mean(0)


def _to_grid(probs: Tensor, size: tuple[int, int]) -> Tensor:
    """One layer's ``(B, pixels, tokens)`` map as ``(B, tokens, H, W)``: its grid is the latent's, halved k times."""
    batch, pixels, tokens = probs.shape
    for k in range(16):
        h, w = -(-size[0] // 2**k), -(-size[1] // 2**k)
        if h * w == pixels:
            grid = probs.transpose(1, 2).reshape(batch, tokens, h, w)
            return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    raise LorakitError(f"an attention map over {pixels} pixels is not the latent grid {tuple(size)} halved k times")


def lora_attention(unet: nn.Module, name: str, latents: Tensor, t: Tensor | int,
                   states: Tensor) -> tuple[Tensor, Tensor]:
    """LoRA ``name``'s pass: its noise prediction ``eps_i`` and its Eq. A maps ``(B, tokens, H, W)``."""
    with capture_cross_attention(unet) as store:
        eps = lora_noise(unet, name, latents, t, states)
    return eps, attention_maps(store, tuple(latents.shape[-2:]))


def contrastive_loss(maps: Sequence[Tensor], concepts: Sequence[Sequence[int]], temperature: float = 0.5) -> Tensor:
    """Eq. L over the concept tokens' maps of every pass (``maps[i]``: ``(B, tokens, H, W)``)."""
    require(temperature > 0, "temperature", temperature, "must be > 0")
    items = torch.cat([m[:, list(c)] for m in maps for c in concepts], dim=1)  # (B, m, H, W)
    labels = torch.tensor([i for _ in maps for i, c in enumerate(concepts) for _ in c], device=items.device)
    z = F.normalize(items.flatten(2).float(), dim=-1)
    sim = z @ z.transpose(1, 2) / temperature  # (B, m, m)
    same = labels[:, None] == labels[None, :]
    pos, neg = same & ~torch.eye(len(labels), dtype=torch.bool, device=z.device), ~same
    valid = pos.any(-1) & neg.any(-1)
    if not valid.any():
        return sim.new_zeros(())
    negatives = torch.logsumexp(sim.masked_fill(~neg, float("-inf")), dim=-1, keepdim=True)
    terms = torch.logaddexp(sim, negatives) - sim  # -log(exp(s_ap) / (exp(s_ap) + sum_N exp(s_ab)))
    per_anchor = (terms * pos).sum(-1) / pos.sum(-1).clamp_min(1)
    return per_anchor[:, valid].mean()


def semantic_masks(maps: Sequence[Tensor], concepts: Sequence[Sequence[int]]) -> Tensor:
    """Eq. M: ``(n, B, 1, H, W)`` one-hot masks, LoRA ``i``'s where concept ``i`` wins; they sum to 1 everywhere."""
    own = torch.stack([m[:, list(c)].mean(1) for m, c in zip(maps, concepts)])  # (n, B, H, W)
    own = own / own.flatten(2).amax(-1)[..., None, None].clamp_min(torch.finfo(own.dtype).tiny)
    return F.one_hot(own.argmax(0), len(maps)).permute(3, 0, 1, 2).unsqueeze(2).to(own.dtype)


def update_latents(unet: nn.Module, names: Sequence[str], latents: Tensor, t: Tensor | int,
                   states: Tensor | Sequence[Tensor], concepts: Sequence[Sequence[int]], step_size: float = 0.01,
                   temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """Eq. U: ``latents - step_size * grad L`` and the loss ``L`` (Eq. L) at ``latents``."""
    per_lora = _check(unet, names, states, concepts)
    require(step_size >= 0, "step_size", step_size, "must be >= 0")
    z = latents.detach().requires_grad_(True)
    with torch.enable_grad():
        maps = [lora_attention(unet, n, z, t, s)[1] for n, s in zip(names, per_lora)]
        loss = contrastive_loss(maps, concepts, temperature)
    if not loss.requires_grad:  # no negatives: nothing to separate
        return latents, loss
    (grad,) = torch.autograd.grad(loss, z)
    return (z - step_size * grad).detach(), loss.detach()


def clora_step(unet: nn.Module, names: Sequence[str], latents: Tensor, t: Tensor | int,
               states: Tensor | Sequence[Tensor], concepts: Sequence[Sequence[int]], step: Step, *,
               update: bool = True, step_size: float = 0.01, temperature: float = 0.5) -> ContrastiveStep:
    """One CLoRA step (Eqs. U, A, M, F): optional latent update, per-LoRA passes, masked fusion, ``step``.

    ``states``: the text states shared by all LoRAs, or one per LoRA (each LoRA's own prompt).
    """
    per_lora = _check(unet, names, states, concepts)
    loss = latents.new_zeros(())
    if update:
        latents, loss = update_latents(unet, names, latents, t, states, concepts, step_size, temperature)
    with torch.no_grad():
        passes = [lora_attention(unet, n, latents, t, s) for n, s in zip(names, per_lora)]
        masks = semantic_masks([maps for _, maps in passes], concepts)
        eps = (masks * torch.stack([e for e, _ in passes])).sum(0)
        return ContrastiveStep(step(eps, t, latents), masks, loss)


def clora_sample(unet: nn.Module, names: Sequence[str], latents: Tensor, states: Tensor | Sequence[Tensor],
                 concepts: Sequence[Sequence[int]], timesteps: Sequence[int] | Tensor, step: Step, *,
                 update_steps: int | None = None, step_size: float = 0.01, temperature: float = 0.5) -> Tensor:
    """Sample with CLoRA: :func:`clora_step` at every timestep, updating the latent in the first ``update_steps``
    (default: the first half, where the layout forms)."""
    update_steps = len(timesteps) // 2 if update_steps is None else update_steps
    require(isinstance(update_steps, int) and 0 <= update_steps <= len(timesteps), "update_steps", update_steps,
            f"must be an integer in [0, {len(timesteps)}] (the number of steps)")
    for k, t in enumerate(timesteps):
        latents = clora_step(unet, names, latents, t, states, concepts, step, update=k < update_steps,
                             step_size=step_size, temperature=temperature).latents
    return latents


def _check(unet: nn.Module, names: Sequence[str], states: Tensor | Sequence[Tensor],
           concepts: Sequence[Sequence[int]]) -> list[Tensor]:
    """Validate the LoRAs and their concepts; the text states of each LoRA."""
    check_loras(unet, names)
    per_lora = [states] * len(names) if isinstance(states, Tensor) else list(states)
    require(len(per_lora) == len(names), "states", f"{len(per_lora)} tensors",
            f"must be one tensor or one per LoRA ({len(names)})")
    require(len(concepts) == len(names), "concepts", list(concepts),
            f"must hold one token list per LoRA ({len(names)})")
    tokens = per_lora[0].shape[1]
    flat = [i for c in concepts for i in c]
    require(all(len(c) > 0 for c in concepts) and all(isinstance(i, int) and 0 <= i < tokens for i in flat),
            "concepts", list(concepts), f"must be non-empty lists of token indices in [0, {tokens})")
    require(len(set(flat)) == len(flat), "concepts", list(concepts), "must not share tokens")
    return per_lora
