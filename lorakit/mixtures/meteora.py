"""MeteoRA (Xu et al., 2024): many off-the-shelf task LoRAs embedded in one model as frozen experts, with a trained
token-level top-k gate on every adapted layer.

    names, gate = load_meteora(model, {"math": "loras/math", "code": "loras/code", ...})   # frozen, gate top-2
    with lorakit.mix(model, names, gate):          # layer l, token t: W x + sum_{i in top2} w_{t,i} B_i A_i x
        loss = model(**batch).loss                  # only the gate trains (lorakit.trainable_parameters(model))
    gate_accuracy(model, names, gate, batches, task_labels)   # {"mean": ..., "<layer path>": ...}

Equation (the paper's MoE layer): ``w_t = top2(softmax(G_l x_t))`` renormalised over the two kept experts,
``h_t = W x_t + sum_i w_{t,i} dW_i x_t``; ``G_l`` is a bias-free linear gate per layer (:class:`GateRouter`, zero
at init: uniform weights). The experts are PEFT folders loaded by :func:`~lorakit.mixtures.files.load_experts`.

What the abstract leaves open, and what is assumed here:

* The paper's accelerated forward (batched products over all adapters, custom kernels) is replaced by lorakit's
  sparse dispatch: each expert runs once per layer and forward, on the tokens routed to it only.
* Gate accuracy: the paper reports how often the gate picks the adapter of the task an input comes from. Here a
  token's choice is the argmax of its gate softmax; :func:`gate_accuracy` reports it per layer, and as ``"mean"``
  for the argmax of the softmax averaged over the layers (one choice per token). Padding tokens (``attention_mask``
  0) are not counted. The gate runs in eval mode (no noise) while it is measured.
"""
from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from ..mixing import add_router, gate_router, mix
from ..routing.routers import GateRouter
from ..routing.weighted import Router
from .files import load_experts

MISSING = object()


def load_meteora(model: nn.Module, folders: Mapping[str, str | Path], router: str = "meteora", top_k: int | None = 2,
                 **options: Any) -> tuple[list[str], GateRouter]:
    """Load each PEFT folder as a frozen expert and add a top-``top_k`` gate router ``router`` over them
    (``options``: :func:`lorakit.gate_router`'s); returns the expert names, in routing order, and the router."""
    names = load_experts(model, folders, frozen=True)
    return names, add_router(model, router, gate_router(model, names, top_k=top_k, **options))


@torch.no_grad()
def gate_accuracy(model: nn.Module, names: Sequence[str], router: Router, batches: Iterable[Tensor | Mapping],
                  labels: Iterable[Tensor | Sequence[int]]) -> dict[str, float]:
    """Share of tokens whose top-1 expert is the task label of their row: ``"mean"`` (the argmax of the gate softmax
    averaged over layers) and one entry per layer path. ``batches``: input ids ``(B, T)`` or dicts of model
    arguments; ``labels``: per batch, the expert index of each row ``(B,)``."""
    n = len(names)
    hits: dict[str, int] = {}
    counted = 0
    was_training = getattr(router, "training", None)
    if isinstance(router, nn.Module):
        router.eval()
    seen: dict[str, Tensor] = {}  # layer path -> gate softmax of the current batch

    def recording(path: str, x: Tensor) -> Tensor:
        weights = router(path, x)
        probs = weights
        if isinstance(router, GateRouter):
            probs = F.softmax(router.logits(path, x).float() / router.temperature, dim=-1)
        seen[path] = F.pad(probs, (0, n - probs.shape[-1]))
        return weights

    try:
        for step, (batch, label) in enumerate(zip_longest(batches, labels, fillvalue=MISSING)):
            if batch is MISSING or label is MISSING:
                raise LorakitError("gate_accuracy: give one label tensor per batch (the numbers of batches and label "
                                   "tensors differ)")
            seen.clear()
            with mix(model, names, recording):
                model(**batch) if isinstance(batch, Mapping) else model(batch)
            label = torch.as_tensor(label)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if not seen:
                raise LorakitError("gate_accuracy: the router was never asked (no layer holds the experts)")
            rows, tokens = next(iter(seen.values())).shape[:2]
            if label.shape != (rows,) or label.is_floating_point():
                raise LorakitError(f"gate_accuracy: batch {step} has {rows} rows; its labels must be ({rows},) "
                                   f"integer expert indices, got {tuple(label.shape)} {label.dtype}")
            keep = torch.ones(rows, tokens, dtype=torch.bool) if mask is None else mask.bool().cpu()
            for path, probs in seen.items():
                if probs.shape[:2] != (rows, tokens):
                    raise LorakitError(f"gate_accuracy: layer {path!r} routed input of shape {tuple(probs.shape)}; "
                                       f"needs (rows, tokens, n) = ({rows}, {tokens}, {n})")
            seen["mean"] = torch.stack([p.cpu() for p in seen.values()]).mean(0)
            for path, probs in seen.items():
                hit = (probs.cpu().argmax(-1) == label.cpu().unsqueeze(1)) & keep
                hits[path] = hits.get(path, 0) + int(hit.sum())
            counted += int(keep.sum())
    finally:
        if isinstance(router, nn.Module) and was_training:
            router.train()
    if not counted:
        raise LorakitError("gate_accuracy: no tokens to count (give at least one batch with unmasked tokens)")
    return {path: value / counted for path, value in sorted(hits.items(), key=lambda kv: kv[0] != "mean")}
