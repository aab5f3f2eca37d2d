"""X-LoRA: a mixture of frozen LoRA experts weighted per token and layer by a scalings head.

X-LoRA (Buehler & Buehler 2024, METHODS.md entry 43) keeps the experts and the base frozen and trains only a small
head. The paper's variant (and PEFT's ``XLoraModel``) takes two passes per forward:

1. the base model alone (adapters off, no gradient) gives the hidden states ``h`` of its last layer;
2. the head maps them to scalings ``lambda = softmax(head(h) / tau)``, shape ``(B, T, L, n)`` (``L`` adapted layers,
   one set per layer with ``layerwise=True``, else one set shared by all layers), optionally kept to the top ``k``
   per token (and re-softmaxed over the kept ones with ``softmax_topk``); the model runs again with every adapted
   layer computing ``h_l = W_l x + sum_i lambda_{t,l,i} B_{l,i} A_{l,i} x``.

:func:`xlora_forward` runs both passes through :func:`lorakit.mix`; :class:`XLoraHead` is the head (``depth`` linear
layers with ReLU between them, as PEFT builds its ``XLoraClassifier``; :meth:`XLoraHead.load_peft_state` loads a
PEFT classifier's tensors). The single-pass alternative, scalings from each layer's own input instead of a first
pass, is :func:`lorakit.gate_router` (``lorakit.mix(model, names, router)``): half the compute and it works with a
KV cache during generation; it is not the paper's variant.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hosts.host import hosts
from ..inject import disable
from ..mixing import mix
from ..routing.routers import ROUTER_KINDS


@ROUTER_KINDS.decorator("xlora")
class XLoraHead(nn.Module):
    """Scalings ``(B, T, L, n)`` from the last hidden states ``(B, T, hidden_size)``.

    Args:
        hidden_size: width of the model's last hidden states.
        layers: the adapted layers' paths in module order (``L`` of them).
        n: number of experts.
        layerwise: one set of scalings per layer (else one shared set).
        depth: number of linear layers (ReLU between them); ``size`` is their hidden width when ``depth > 1``.
        softmax: softmax over the experts (temperature ``temperature``).
        top_k: keep the ``k`` largest scalings per token and layer (``None``: all).
        softmax_topk: re-softmax the kept scalings.
        dropout: dropout between the head's layers while training.
        experts: the expert adapters' names, in the order of the scalings (``n`` of them; default ``0 .. n-1``).
    """

    kind = "xlora"

    def __init__(self, hidden_size: int, layers: Sequence[str], n: int, layerwise: bool = False, depth: int = 1,
                 size: int = 2048, softmax: bool = True, temperature: float = 1.0, top_k: int | None = None,
                 softmax_topk: bool = False, dropout: float = 0.0, experts: Sequence[str] | None = None) -> None:
        super().__init__()
        require(isinstance(n, int) and n >= 1, "n", n, "must be a positive integer")
        require(len(layers) > 0 and len(set(layers)) == len(layers), "layers", list(layers)[:3],
                "must be distinct layer paths, at least one")
        require(isinstance(depth, int) and depth >= 1, "depth", depth, "must be an integer >= 1")
        require(top_k is None or (isinstance(top_k, int) and 1 <= top_k <= n), "top_k", top_k,
                f"must be None or an integer in [1, {n}]")
        require(temperature > 0 and 0 <= dropout < 1, "temperature / dropout", (temperature, dropout),
                "temperature must be > 0 and dropout in [0, 1)")
        self.hidden_size, self.layers, self.n, self.layerwise = hidden_size, list(layers), n, layerwise
        self.depth, self.size, self.softmax, self.temperature = depth, size, softmax, float(temperature)
        self.top_k, self.softmax_topk, self.dropout = top_k, softmax_topk, dropout
        self.experts = [str(i) for i in range(n)] if experts is None else list(experts)
        require(len(self.experts) == n and len(set(self.experts)) == n, "experts", self.experts,
                f"must be {n} distinct adapter names")
        self.index = {path: i for i, path in enumerate(self.layers)}
        out = n * (len(self.layers) if layerwise else 1)
        widths = [hidden_size] + [size] * (depth - 1) + [out]
        stages: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                stages += [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            stages.append(nn.Linear(a, b))
        self.net = nn.Sequential(*stages)

    def config(self) -> dict[str, Any]:
        """What rebuilds this head (saved beside its tensors)."""
        return {"hidden_size": self.hidden_size, "layers": self.layers, "n": self.n, "layerwise": self.layerwise,
                "depth": self.depth, "size": self.size, "softmax": self.softmax, "temperature": self.temperature,
                "top_k": self.top_k, "softmax_topk": self.softmax_topk, "dropout": self.dropout,
                "experts": self.experts}

    def load_peft_state(self, state: dict[str, Tensor]) -> None:
        """Load the tensors of PEFT's ``XLoraClassifier`` (``layers.<i>.weight`` / ``.bias``), linear layer by
        linear layer in order."""
        mine = [m for m in self.net if isinstance(m, nn.Linear)]
        theirs = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
        if len(theirs) != len(mine):
            raise LorakitError(f"the PEFT classifier has {len(theirs)} linear layers, this head {len(mine)}")
        with torch.no_grad():
            for linear, i in zip(mine, theirs):
                for key in ("weight", "bias"):
                    value = state[f"layers.{i}.{key}"]
                    if value.shape != getattr(linear, key).shape:
                        raise LorakitError(f"PEFT classifier tensor layers.{i}.{key} has shape {tuple(value.shape)}"
                                           f", this head expects {tuple(getattr(linear, key).shape)}")
                    getattr(linear, key).copy_(value)

    def forward(self, hidden: Tensor) -> Tensor:
        """Scalings ``(B, T, L, n)`` of hidden states ``(B, T, hidden_size)``, before the top-k of each layer."""
        if hidden.shape[-1] != self.hidden_size:
            raise LorakitError(f"the X-LoRA head reads hidden states of width {self.hidden_size}, got "
                               f"{tuple(hidden.shape)}")
        first = self.net[0]
        logits = self.net(hidden.to(first.weight.dtype))
        scalings = logits.reshape(*hidden.shape[:-1], len(self.layers) if self.layerwise else 1, self.n)
        scalings = scalings.expand(*hidden.shape[:-1], len(self.layers), self.n)
        return F.softmax(scalings / self.temperature, dim=-1) if self.softmax else scalings

    def of_layer(self, scalings: Tensor, path: str) -> Tensor:
        """Layer ``path``'s scalings ``(B, T, n)``, kept to the top ``k`` (and re-softmaxed) as configured."""
        if path not in self.index:
            raise LorakitError(f"the X-LoRA head has no scalings for layer {path!r}; it serves {len(self.layers)} "
                               f"layers, e.g. {self.layers[:3]}")
        s = scalings[..., self.index[path], :]
        if self.top_k is None or self.top_k == self.n:
            return s
        kept = torch.zeros_like(s, dtype=torch.bool).scatter(-1, s.topk(self.top_k, dim=-1).indices, True)
        if self.softmax_topk:
            return F.softmax(s.masked_fill(~kept, float("-inf")), dim=-1)
        return s * kept


def xlora_head(model: nn.Module, names: Sequence[str], **options: Any) -> XLoraHead:
    """An :class:`XLoraHead` over experts ``names`` for every layer of ``model`` holding one of them (in module
    order, as PEFT numbers them), sized to the model's hidden states, on its device and dtype."""
    layers = [h.path for h in hosts(model) if any(n in h.adapters for n in names)]
    if not layers:
        raise LorakitError(f"no layer of this model holds any of the experts {list(names)}")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise LorakitError("X-LoRA reads the model's last hidden states: the model needs `config.hidden_size` "
                           "and `output_hidden_states` (a transformers model)")
    first = next(model.parameters())
    head = XLoraHead(hidden, layers, len(names), experts=names, **options)
    return head.to(device=first.device, dtype=first.dtype if first.is_floating_point() else None)


_CACHES = ("past_key_values", "cache")  # the KV cache's keyword (transformers 4 / 5)


def xlora_scalings(model: nn.Module, head: XLoraHead, inputs: dict[str, Any]) -> Tensor:
    """Pass 1: the base model's last hidden states on ``inputs`` (no gradient, no KV cache) through ``head``."""
    if any(inputs.get(key) is not None for key in _CACHES):
        raise LorakitError("two-pass X-LoRA recomputes the base model's hidden states of the whole sequence, so it "
                           "cannot continue from a KV cache: generate with use_cache=False, or route in one pass "
                           "with lorakit.gate_router")
    first_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache", *_CACHES)}
    with torch.no_grad(), disable(model):
        first = model(**first_inputs, output_hidden_states=True, use_cache=False)
    return head(first.hidden_states[-1])


def _router(head: XLoraHead, scalings: Tensor) -> Callable[[str, Tensor], Tensor]:
    return lambda path, x: head.of_layer(scalings, path)


def xlora_forward(model: nn.Module, head: XLoraHead, dispatch: str = "sparse", **inputs: Any) -> Any:
    """The paper's two passes: the base model's last hidden states -> ``head`` -> scalings -> the model again with
    every adapted layer weighting the head's experts by them. ``inputs`` are the model's (``input_ids``, ``labels``,
    ...); returns the second pass's output, with the scalings as ``output.xlora_scalings``."""
    scalings = xlora_scalings(model, head, inputs)
    with mix(model, head.experts, _router(head, scalings), dispatch=dispatch):
        out = model(**inputs)
    out["xlora_scalings"] = scalings
    return out


def attach_xlora(model: nn.Module, head: XLoraHead, dispatch: str = "sparse") -> Callable[[], None]:
    """Make every call of ``model`` an X-LoRA forward (both passes), so evaluation loops, trainers and
    ``generate(use_cache=False)`` use the mixture unchanged; returns a function that detaches it."""
    state: dict[str, Any] = {"busy": False, "mix": None}

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state["busy"]:
            return  # the first pass's own call
        if args:
            raise LorakitError("an X-LoRA model takes keyword inputs (input_ids=..., attention_mask=...)")
        state["busy"] = True
        try:
            scalings = xlora_scalings(module, head, kwargs)
        finally:
            state["busy"] = False
        state["mix"] = mix(model, head.experts, _router(head, scalings), dispatch=dispatch)
        state["mix"].__enter__()

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if state["mix"] is not None and not state["busy"]:
            state["mix"], entered = None, state["mix"]
            entered.__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True, always_call=True)]

    def detach() -> None:
        for handle in handles:
            handle.remove()

    return detach
