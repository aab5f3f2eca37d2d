"""Data-driven initialisation: ``lorakit.initialize(model, batches)`` for LoRA-GA, EVA and LoRA-SB.

The adapter is created first (``adapt(model, LoraConfig(init="lora-ga"))`` starts it at its identity placeholder);
``initialize`` then runs the *base* model (adapters disabled) on the batches and, for a group of
``layers_per_pass`` layers at a time, collects each layer's statistic:

* ``"gradient"``: the mean full-weight gradient ``dL/dW``. Only the group's base weights require grad during the
  pass, so autograd builds no graph below the group and only the group's full-weight gradients exist at once
  (PEFT's ``preprocess_loraga`` keeps every target's gradient alive together). Groups hold ``layers_per_pass``
  layers, or by default as many as fit in :data:`GRADIENT_BUDGET` bytes of float32 gradients (one pass for a
  small model such as SmolLM2-135M; a few layers per pass for a 7B model);
* ``"inputs"``: the Gram matrix ``X^T X`` of the layer's inputs, from forward hooks, under ``no_grad``.

Each layer's statistic is reduced by the initialiser right away (to factors or a small summary) and freed. When
the factors change a layer's rank (EVA), the adapter is rebuilt with a ``rank_pattern`` first.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .errors import require
from .hosts.geometry import is_transposed
from .hosts.host import HostLayer, adapters_named
from .init.layout import factor_dtype, precise
from .init.registry import INITS, Factors, LayerInfo, options_of
from .inject import active_adapters, adapt, config_of, configs, delete_adapter, disable, hosts, set_active

GRADIENT_BUDGET = 2**30  # bytes of float32 full-weight gradients per pass when layers_per_pass is not given

LossFn = Callable[[Any, Any], Tensor]
ModelLoss = Callable[[nn.Module, Any], Tensor]


def initialize(model: nn.Module, data: Iterable[Any], adapter: str = "default", *, batches: int = 8,
               loss_fn: LossFn | None = None, model_loss: ModelLoss | None = None,
               layers_per_pass: int | None = None) -> nn.Module:
    """Run adapter ``adapter``'s data-driven initialiser (its config's ``init``) on the first ``batches`` of ``data``.

    Args:
        data: batches; a mapping is called as ``model(**batch)``, a tuple as ``model(*batch)``, else ``model(batch)``.
        loss_fn: ``loss_fn(output, batch) -> scalar`` for gradient-based initialisers (default: ``output.loss``).
        model_loss: ``model_loss(model, batch) -> scalar``, instead of calling the model here and ``loss_fn``
            (for losses that need their own forward, e.g. a task's); its value is unused for input statistics.
        layers_per_pass: layers whose gradients are gathered in one pass over the batches (memory vs passes);
            default: as many as fit in :data:`GRADIENT_BUDGET` bytes. Input statistics always take one pass.
    """
    config = config_of(model, adapter)
    init = getattr(config, "init", None)
    require(init in INITS and INITS.get(init).needs_data, "init", init,
            f"adapter {adapter!r} must use a data-driven initialiser "
            f"({', '.join(n for n in INITS.names() if INITS.get(n).needs_data)})")
    require(layers_per_pass is None or layers_per_pass >= 1, "layers_per_pass", layers_per_pass,
            "must be None (fill the gradient budget) or >= 1")
    require(model_loss is None or loss_fn is None, "model_loss", model_loss, "replaces loss_fn; give one of them")
    spec = INITS.get(init)
    forward = model_loss or (_loss_of(loss_fn) if spec.statistic == "gradient" else _call)
    options = options_of(init, config.init_options)
    layers = [h for h, _ in adapters_named(model, adapter)]
    for host in layers:
        require(host.geometry.kind == "linear", "init", init,
                f"needs linear layers; {host.path!r} is a {type(host.base_layer).__name__}")
    stored = list(itertools.islice(data, batches))
    require(len(stored) > 0, "data", data, "yielded no batches")
    infos = {h.path: _info(h, adapter) for h in layers}
    summaries: dict[str, Any] = {}
    groups = _passes(layers, layers_per_pass) if spec.statistic == "gradient" else [layers]  # Grams are small
    for group in groups:
        collect = _gradients if spec.statistic == "gradient" else _input_grams
        done: dict[tuple[Any, ...], Any] = {}  # layers fed one input share its Gram: summarise it once per shape
        for path, stat in collect(model, group, stored, forward).items():
            info = infos[path]
            key = (id(stat), info.rows, info.cols, info.r, info.scale)
            if key not in done:
                done[key] = spec.fn(stat, info, **options)
            summaries[path] = done[key]
    factors = spec.combine(summaries, infos, **options) if spec.combine else summaries
    _apply(model, adapter, factors, infos)
    return model


def _passes(layers: list[HostLayer], per_pass: int | None) -> list[list[HostLayer]]:
    """``layers`` cut into groups of ``per_pass``, or (``None``) of at most :data:`GRADIENT_BUDGET` gradient bytes
    (at least one layer each)."""
    if per_pass is not None:
        return [layers[i : i + per_pass] for i in range(0, len(layers), per_pass)]
    groups: list[list[HostLayer]] = [[]]
    used = 0
    for host in layers:
        size = 4 * host.geometry.d_in * host.geometry.d_out
        if groups[-1] and used + size > GRADIENT_BUDGET:
            groups.append([])
            used = 0
        groups[-1].append(host)
        used += size
    return groups


def _info(host: HostLayer, adapter: str) -> LayerInfo:
    module = host.adapters[adapter]
    return LayerInfo(host.path, host.geometry.d_out, host.geometry.d_in, module.config.r, module.scale)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _loss_of(loss_fn: LossFn | None) -> ModelLoss:
    """``model_loss`` from a ``loss_fn(output, batch)`` (default: the output's ``.loss``)."""

    def run(model: nn.Module, batch: Any) -> Tensor:
        out = _call(model, batch)
        loss = loss_fn(out, batch) if loss_fn is not None else getattr(out, "loss", None)
        require(isinstance(loss, Tensor), "loss_fn", loss_fn,
                "is needed: the model output has no .loss (pass loss_fn(output, batch) -> scalar)")
        return loss

    return run


def _gradients(model: nn.Module, group: list[HostLayer], batches: list[Any], run: ModelLoss) -> dict[str, Tensor]:
    """Mean ``dL/dW`` of each layer in ``group`` (``(d_out, d_in)``, >= float32); other weights get no gradient."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    weights = {h.path: h.base_layer.weight for h in group}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with disable(model), torch.enable_grad():
            for batch in batches:
                run(model, batch).backward()
        grads = {}
        for host in group:
            g = precise(weights[host.path].grad) / len(batches)
            grads[host.path] = g.t() if is_transposed(host.base_layer) else g  # (d_out, d_in)
            weights[host.path].grad = None
        return grads
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _input_grams(model: nn.Module, group: list[HostLayer], batches: list[Any],
                 run: Callable[[nn.Module, Any], Any]) -> dict[str, Tensor]:
    """``X^T X`` of each layer's inputs over every token of every batch (``(d_in, d_in)``, >= float32).

    Layers fed the same tensor (q/k/v, gate/up) share one product per batch, and one accumulated Gram matrix (the
    same tensor object) when they shared their input in every batch. ``seen`` keeps each input alive for the batch's
    forward pass, so a tensor's storage cannot be reused by another input of the same shape.
    """
    totals: dict[tuple[str, ...], Tensor] = {}  # layers sharing one input in some batch -> their summed Gram
    seen: dict[tuple[Any, ...], tuple[Tensor, Tensor, list[str]]] = {}  # input key -> (input, Gram, its layers)

    def hook(host: HostLayer) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)  # views of one storage differ in strides
            if key not in seen:
                flat = precise(x.reshape(-1, host.geometry.d_in))  # (tokens, d_in)
                seen[key] = (x, flat.t() @ flat, [])  # (d_in, d_in)
            seen[key][2].append(host.path)

        return record

    handles = [h.register_forward_pre_hook(hook(h)) for h in group]
    try:
        with disable(model), torch.no_grad():
            for batch in batches:
                run(model, batch)
                for _, gram, paths in seen.values():
                    sharing = tuple(paths)
                    totals[sharing] = totals[sharing] + gram if sharing in totals else gram
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[str, list[tuple[str, ...]]] = {}
    for sharing in totals:
        for path in sharing:
            groups.setdefault(path, []).append(sharing)
    summed: dict[tuple[tuple[str, ...], ...], Tensor] = {}
    for parts in groups.values():
        key = tuple(parts)
        if key not in summed:  # usually one part: the same layers shared their input in every batch
            summed[key] = sum((totals[p] for p in parts[1:]), totals[parts[0]])
    return {path: summed[tuple(parts)] for path, parts in groups.items()}


def _apply(model: nn.Module, adapter: str, factors: dict[str, Factors], infos: dict[str, LayerInfo]) -> None:
    """Set every layer's factors, first rebuilding the adapter if the initialiser changed ranks or dropped layers."""
    ranks = {p: f.a.shape[0] for p, f in factors.items()}
    if ranks != {p: info.r for p, info in infos.items()}:
        _rebuild(model, adapter, ranks, infos)
    for host in hosts(model):
        if host.path in factors:
            module = host.adapters[adapter]
            module.apply_factors(factors[host.path], factor_dtype(host.backend, next(module.parameters()).dtype))
            host.attach(adapter, module)


def _rebuild(model: nn.Module, adapter: str, ranks: dict[str, int], infos: dict[str, LayerInfo]) -> None:
    """Re-create ``adapter`` on the layers in ``ranks`` with those ranks, keeping each layer's scale."""
    config = configs(model)[adapter]
    was_active = active_adapters(model)
    keys = {p: re.escape(p) for p in ranks}
    root = (lambda r: r**0.5) if getattr(config, "use_rslora", False) else (lambda r: r)
    new = config.replace(
        targets=tuple(keys), exclude=(),
        rank_pattern={keys[p]: r for p, r in ranks.items()},
        alpha_pattern={keys[p]: infos[p].scale * root(r) for p, r in ranks.items()},
    )
    delete_adapter(model, adapter)
    adapt(model, new, adapter, activate=False)
    set_active(model, [n for n in was_active if n in configs(model)])
