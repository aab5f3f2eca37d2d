"""Quantise a model's frozen base: ``lorakit.quantize(model, scheme="nf4")`` (QLoRA's base, METHODS.md entry 39).

Every targeted ``nn.Linear`` is replaced by its codec's frozen quantised module (:mod:`lorakit.hosts.codecs`); a
layer that already hosts adapters keeps them and gets a :class:`~lorakit.hosts.quantized.QuantizedBackend`, so
``quantize`` may be called before or after :func:`lorakit.adapt` and every method composes with the quantised base.

Order matters only for what the adapters start from: quantising first is QLoRA (adapters see ``Q(W)``, identity at
init holds for every method); quantising after an initialiser rewrote the base quantises the rewritten base
(PiSSA's residual becomes QPiSSA, METHODS.md entry 20). Cast the model to its compute dtype (bf16/fp32) *before*
quantising: the quantised weight dequantises to the dtype it was quantised from.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..config import ALL_LINEAR, AdapterConfig
from ..errors import LorakitError, TargetError, require
from ..hosts.codecs import CODECS, check_available, codec_of, storage_bits
from ..hosts.host import HostLayer
from ..hosts.quantized import QuantizedBackend
from ..inject import _replace, hosts
from ..targeting import find_targets

# bitsandbytes: on this project's CPUs its native (de)quantisation kernels make a QLoRA step 1.08x an fp32 LoRA step
# against torchao's 1.22x (pure-PyTorch dequantisation, ~7x slower per call), and it takes any shape (torchao needs
# numel % block == 0); torchao stores slightly fewer bits on small matrices. See docs/benchmarks.md.
DEFAULT_BACKEND = "bitsandbytes"


def quantize(model: nn.Module, scheme: str = "nf4", backend: str = DEFAULT_BACKEND,
             targets: str | Sequence[str] = ALL_LINEAR, exclude: str | Sequence[str] = (), block: int = 64,
             ) -> nn.Module:
    """Store the targeted linear layers' frozen weights in ``scheme`` with ``backend``; returns ``model``.

    Args:
        scheme: ``"nf4"`` (QLoRA), ``"fp4"`` (bitsandbytes), or lorakit's k-bit ``"nf2"``/``"nf3"``/``"int2"``...
        backend: ``"bitsandbytes"`` (default), ``"torchao"`` or ``"lorakit"`` (see :data:`CODECS`).
        targets / exclude: which layers, with :class:`~lorakit.AdapterConfig`'s rules (default: every linear
            layer except the output head).
        block: values per absmax block (QLoRA: 64).
    """
    require(backend in CODECS, "backend", backend, f"must be one of {', '.join(CODECS.names())}")
    codec = check_available(backend)
    codec.check(scheme, block)
    chosen = find_targets(model, AdapterConfig(targets=targets, exclude=exclude))
    for path, module in chosen:  # check everything before changing anything
        base = module.base_layer if isinstance(module, HostLayer) else module
        if codec_of(base) is not None:
            raise LorakitError(f"layer {path!r} is already quantised")
        if type(base) is not nn.Linear:
            raise TargetError(f"cannot quantise {path!r}, a {type(base).__name__}; quantisation supports nn.Linear")
        if isinstance(module, HostLayer) and module.merged:
            raise LorakitError(f"layer {path!r} has merged adapters {module.merged}; unmerge before quantising")
    made = [codec.quantize(m.base_layer if isinstance(m, HostLayer) else m, scheme, block) for _, m in chosen]
    for (path, module), quantized in zip(chosen, made):
        if isinstance(module, HostLayer):
            module.base_layer = quantized
            module.backend = QuantizedBackend(quantized, codec)
        else:
            _replace(model, path, quantized)
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantised base module of ``model`` by its path (the host layer's path when it hosts adapters)."""
    out: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if codec_of(module) is not None:
            out[path.removesuffix(".base_layer")] = module
    return out


def bits_per_parameter(model: nn.Module) -> float:
    """Storage bits (codes, scales, second-level scales, tables) per weight of the quantised layers."""
    layers = quantized_layers(model)
    require(bool(layers), "model", type(model).__name__, "has no quantised layers")
    bits = sum(storage_bits(m) for m in layers.values())
    return bits / sum(m.in_features * m.out_features for m in layers.values())


def rounding_errors(model: nn.Module) -> dict[str, float]:
    """``||Q(W) - W|| / ||W||`` of the last write into each quantised base (e.g. by :func:`lorakit.merge`)."""
    return {host.path: host.backend.last_rounding_error for host in hosts(model)
            if isinstance(host.backend, QuantizedBackend) and host.backend.last_rounding_error is not None}
