"""AutoLoRA (METHODS.md entry 58): *Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image
Generation* -- a weight-encoding retriever and gates per layer and diffusion timestep.

Fusion, on every adapted layer ``l`` at diffusion timestep ``t`` with the layer's input ``x`` as context:

    h = W x + sum_i g_i(l, t, x) B_i A_i x,        g(l, t, x) = 2 * sigmoid(G_l [x ; phi(t)])

``phi`` is the sinusoidal timestep embedding of diffusion models and ``G_l`` a ``(n, d_in + t_dim)`` linear gate,
zero at init, so the gates start at 1 everywhere: the plain linear sum of the LoRAs. :class:`GatedFusion` is a router
for :func:`lorakit.mix`; the sampling loop calls :meth:`GatedFusion.set_timestep` before each denoising step, and
:meth:`GatedFusion.override` pins the gates of one (layer, timestep)::

    fusion = lorakit.add_router(unet, "fusion", gated_fusion(unet, ["a", "b"]))
    with lorakit.mix(unet, ["a", "b"], fusion):
        for t in scheduler.timesteps:
            fusion.set_timestep(t)
            eps = unet(latents, t, text_states).sample

Retrieval: :class:`LoraRetriever` maps a LoRA, given only as a flattened state dict (no training data), and a prompt
embedding into one space and ranks LoRAs by cosine similarity. The LoRA side encodes the top-``k`` singular values of
each layer's ``B A`` (the whole vector scaled to unit norm) through a trainable linear projection; the prompt side is
a trainable linear projection of a given text embedding. :meth:`LoraRetriever.contrastive_loss` trains both.

Left open by the abstract, assumed here: the gate's inputs and form (the layer input as context, a sigmoid scaled to
``(0, 2)``), the LoRA encoder (spectral summaries: scale-free, blind to singular vectors) and the retriever's training
objective (symmetric InfoNCE). The gates serve linear layers only; overrides are runtime state, not saved.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hosts.host import hosts
from ..routing.routers import ROUTER_KINDS

# (down, up) key endings of a flattened LoRA state dict: PEFT / lorakit, PEFT embeddings, kohya / diffusers
FACTOR_KEYS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"),
               (".lora_down.weight", ".lora_up.weight"))


@ROUTER_KINDS.decorator("gated_fusion")
class GatedFusion(nn.Module):
    """Gates ``g(l, t, x) = 2 sigmoid(G_l [x ; phi(t)])`` over ``n`` adapters; a router ``(path, x) -> (*tokens, n)``.

    Args:
        n: number of adapters fused.
        layers: layer path -> its input width, for every layer the gates serve.
        t_dim: width of the sinusoidal timestep embedding (even).
    """

    def __init__(self, n: int, layers: Mapping[str, int], t_dim: int = 8) -> None:
        super().__init__()
        require(isinstance(n, int) and n >= 1, "n", n, "must be a positive integer")
        require(isinstance(t_dim, int) and t_dim >= 2 and t_dim % 2 == 0, "t_dim", t_dim,
                "must be an even integer >= 2")
        require(len(layers) > 0, "layers", dict(layers), "must name at least one layer")
        self.n, self.t_dim = n, t_dim
        self.keys = {path: path.replace(".", "-") for path in layers}  # module names cannot hold dots
        self.gates = nn.ModuleDict({self.keys[p]: nn.Linear(d + t_dim, n, bias=False) for p, d in layers.items()})
        for gate in self.gates.values():
            nn.init.zeros_(gate.weight)
        self.timestep: float | None = None
        self.overrides: dict[tuple[str, float], Tensor] = {}

    kind = "gated_fusion"

    def config(self) -> dict[str, Any]:
        """What rebuilds these gates (saved beside their tensors by :func:`lorakit.io.routers.save_router`; the
        per-(layer, timestep) overrides are not saved)."""
        return {"n": self.n, "layers": {p: self.gates[k].in_features - self.t_dim for p, k in self.keys.items()},
                "t_dim": self.t_dim}

    def set_timestep(self, t: float | Tensor) -> None:
        """The diffusion timestep of the coming forward passes (the sampling loop sets it before each step)."""
        self.timestep = _scalar(t)

    def override(self, layer: str, t: float | Tensor, gates: Tensor | Sequence[float]) -> None:
        """Use the fixed gates ``gates`` ``(n,)`` on layer ``layer`` at timestep ``t`` (every other pair unchanged;
        ``overrides.clear()`` drops them all)."""
        require(layer in self.keys, "layer", layer, f"must be a layer these gates serve, e.g. {sorted(self.keys)[:3]}")
        fixed = torch.as_tensor(gates, dtype=torch.float32).detach().clone()
        require(tuple(fixed.shape) == (self.n,), "gates", tuple(fixed.shape), f"must have shape ({self.n},)")
        self.overrides[(layer, _scalar(t))] = fixed

    def forward(self, path: str, x: Tensor) -> Tensor:
        if path not in self.keys:
            raise LorakitError(f"the gates do not serve layer {path!r}; they serve: {sorted(self.keys)[:5]}")
        if self.timestep is None:
            raise LorakitError("no diffusion timestep set: call set_timestep(t) before each denoising step")
        if not x.is_floating_point():
            raise LorakitError(f"layer {path!r}: the gates read a linear layer's input vectors, not token ids")
        fixed = self.overrides.get((path, self.timestep))
        if fixed is not None:
            return fixed.to(device=x.device, dtype=x.dtype)
        gate = self.gates[self.keys[path]]
        phi = timestep_embedding(self.timestep, self.t_dim).to(device=x.device, dtype=gate.weight.dtype)
        context = torch.cat([x.to(gate.weight.dtype), phi.expand(*x.shape[:-1], self.t_dim)], dim=-1)
        return 2 * torch.sigmoid(gate(context))


def gated_fusion(model: nn.Module, names: Sequence[str], t_dim: int = 8) -> GatedFusion:
    """:class:`GatedFusion` over adapters ``names`` with a gate on every linear layer holding one of them."""
    layers = [h for h in hosts(model) if h.geometry.kind == "linear" and any(n in h.adapters for n in names)]
    if not layers:
        raise LorakitError(f"no linear layer of this model holds any of the adapters {list(names)}")
    fusion = GatedFusion(len(names), {h.path: h.geometry.d_in for h in layers}, t_dim)
    w = layers[0].backend.weight()
    return fusion.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)


def timestep_embedding(t: float, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[sin(t f_j), cos(t f_j)]`` with ``f_j = max_period^(-j / (dim/2))``, ``j < dim/2`` (DDPM's embedding)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    return torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)])


def _scalar(t: float | Tensor) -> float:
    require(not isinstance(t, Tensor) or t.numel() == 1, "timestep", getattr(t, "shape", t),
            "must be one number for the whole batch")
    return float(t)


def lora_factors(state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Layer name -> ``(B, A)`` as 2-D matrices, from a flattened LoRA state dict (keys of :data:`FACTOR_KEYS`)."""
    pattern = re.compile("^(.*)(" + "|".join(re.escape(k) for pair in FACTOR_KEYS for k in pair) + ")$")
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            found.setdefault(match.group(1), {})[match.group(2)] = value
    out = {}
    for layer, parts in found.items():
        pair = next(((down, up) for down, up in FACTOR_KEYS if down in parts and up in parts), None)
        if pair is None or len(parts) != 2:
            raise LorakitError(f"layer {layer!r} of the LoRA state dict has {sorted(parts)}; it needs one down and "
                               f"one up factor, named by one of {FACTOR_KEYS}")
        a, b = parts[pair[0]], parts[pair[1]]
        out[layer] = (b.reshape(b.shape[0], -1).float(), a.reshape(a.shape[0], -1).float())
    if not out:
        raise LorakitError(f"no LoRA factors in the state dict (keys such as {sorted(state)[:3]}); expected keys "
                           f"ending in one of {FACTOR_KEYS}")
    return out


def spectral_summary(state: Mapping[str, Tensor], layers: Sequence[str], k: int) -> Tensor:
    """The top-``k`` singular values of ``B A`` per layer of ``layers`` (0 where absent), as one unit vector."""
    factors = lora_factors(state)
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise LorakitError(f"the LoRA has layers the retriever does not know: {unknown[:3]}")
    rows = [_top_singular_values(*factors[name], k) if name in factors else torch.zeros(k) for name in layers]
    summary = torch.cat(rows)
    return summary / summary.norm().clamp_min(1e-12)


def _top_singular_values(b: Tensor, a: Tensor, k: int) -> Tensor:
    """Singular values of ``B A`` from the small ``R_B R_A^T`` (``B = Q_B R_B``, ``A^T = Q_A R_A``), zero-padded."""
    values = torch.linalg.svdvals(torch.linalg.qr(b, mode="r")[1] @ torch.linalg.qr(a.T, mode="r")[1].T)[:k]
    return F.pad(values, (0, k - values.numel()))


class LoraRetriever(nn.Module):
    """Ranks LoRAs (flattened state dicts) for a prompt embedding by cosine similarity in a shared space.

    Args:
        layers: layer names (state-dict prefixes, as :func:`lora_factors` reads them) in a fixed order.
        prompt_dim: width of the prompt embeddings.
        dim: width of the shared space.
        k: singular values kept per layer.
    """

    def __init__(self, layers: Sequence[str], prompt_dim: int, dim: int = 32, k: int = 4) -> None:
        super().__init__()
        require(len(layers) > 0 and len(set(layers)) == len(layers), "layers", list(layers),
                "must be one or more distinct layer names")
        for field, value in (("prompt_dim", prompt_dim), ("dim", dim), ("k", k)):
            require(isinstance(value, int) and value >= 1, field, value, "must be a positive integer")
        self.layers, self.k = list(layers), k
        self.lora_proj = nn.Linear(len(self.layers) * k, dim)
        self.prompt_proj = nn.Linear(prompt_dim, dim)

    def summary(self, state: Mapping[str, Tensor]) -> Tensor:
        """The LoRA's input features: :func:`spectral_summary` over this retriever's layers (no parameters)."""
        return spectral_summary(state, self.layers, self.k).to(self.lora_proj.weight)

    def encode_lora(self, state: Mapping[str, Tensor] | Tensor) -> Tensor:
        """Unit embedding ``(dim,)`` of one LoRA, given as a state dict or as its precomputed :meth:`summary`
        (``(..., features)``: a stack of them gives a stack of embeddings)."""
        features = state if isinstance(state, Tensor) else self.summary(state)
        return F.normalize(self.lora_proj(features), dim=-1)

    def encode_prompt(self, prompt: Tensor) -> Tensor:
        """Unit embeddings ``(..., dim)`` of prompt embeddings ``(..., prompt_dim)``."""
        return F.normalize(self.prompt_proj(prompt.to(self.prompt_proj.weight)), dim=-1)

    def rank(self, prompt: Tensor, library: Mapping[str, Mapping[str, Tensor]], top_m: int) -> list[tuple[str, float]]:
        """The ``top_m`` LoRAs of ``library`` (name -> state dict) most similar to ``prompt`` ``(prompt_dim,)``,
        best first, with their cosine similarity."""
        require(isinstance(top_m, int) and 1 <= top_m <= len(library), "top_m", top_m,
                f"must be an integer in [1, {len(library)}] (the library's size)")
        require(prompt.dim() == 1, "prompt", tuple(prompt.shape), "must be one embedding (prompt_dim,)")
        names = list(library)
        with torch.no_grad():
            scores = torch.stack([self.encode_lora(library[n]) for n in names]) @ self.encode_prompt(prompt)
        best = scores.topk(top_m)
        return [(names[i], float(s)) for s, i in zip(best.values, best.indices)]

    def contrastive_loss(self, prompts: Tensor, summaries: Tensor, temperature: float = 0.1) -> Tensor:
        """Symmetric InfoNCE pairing ``prompts[j]`` ``(m, prompt_dim)`` with the LoRA of ``summaries[j]`` (a stack of
        :meth:`summary`, computed once for a whole training run); the other pairs are the negatives."""
        require(prompts.dim() == 2 and summaries.dim() == 2 and prompts.shape[0] == summaries.shape[0] >= 2,
                "prompts", tuple(prompts.shape),
                f"must be (m, prompt_dim) with m >= 2 and one row per summary (summaries: {tuple(summaries.shape)})")
        require(temperature > 0, "temperature", temperature, "must be > 0")
        logits = self.encode_prompt(prompts) @ self.encode_lora(summaries).T / temperature
        target = torch.arange(prompts.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
