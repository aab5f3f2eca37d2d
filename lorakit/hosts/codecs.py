"""Quantisation codecs: one small adapter per library that stores a frozen linear weight in few bits.

A codec turns an ``nn.Linear`` into a frozen quantised module that is still an ``nn.Linear`` (so targeting and
geometry see an ordinary linear layer), dequantises it, requantises it in place and lists the tensors that store
it. Three are registered (:data:`CODECS`):

* ``"torchao"``: torchao's ``NF4Tensor`` (QLoRA's NF4 with double quantisation) as the weight of a plain
  ``nn.Linear``; ``F.linear`` on it dequantises to the input's dtype in forward and backward (torchao's
  ``LinearNF4``). Its double quantisation needs the number of 64-value blocks to be a multiple of the scaler
  block; we take the largest power of two <= 256 (the paper's) that divides it (SmolLM2's 576-wide layers: 64).
* ``"bitsandbytes"``: ``bnb.nn.Linear4bit`` with ``compress_statistics=True`` (double quantisation), schemes
  ``"nf4"`` and ``"fp4"``; bitsandbytes >= 0.48 runs it on CPU.
* ``"lorakit"``: :mod:`lorakit.hosts.codebook`, k-bit NormalFloat / uniform for the widths the libraries lack
  (LQ-LoRA's and INT2.1's 2- and 3-bit bases).

Neither library's quantiser is idempotent (``quantize(dequantize(q)) != q``: the double-quantised block scales
move), so writing a weight back (merging) rounds it again; the error is measured by :class:`QuantizedBackend`.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from ..errors import LorakitError, require
from ..registry import Registry
from . import codebook


class Codec(ABC):
    """One quantisation library behind the API the quantised base backend needs."""

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    shardable: ClassVar[bool] = False  # its quantised weights implement FSDP2's sharding (``finetune --fsdp``)

    def check(self, scheme: str, block: int) -> None:
        require(scheme in self.schemes, "scheme", scheme,
                f"is not supported by backend {self.name!r}; it supports: {', '.join(self.schemes)}")
        require(isinstance(block, int) and block >= 2, "block", block, "must be an integer >= 2")

    @abstractmethod
    def quantize(self, linear: nn.Linear, scheme: str, block: int) -> nn.Linear:
        """A frozen quantised copy of ``linear`` (same bias, compute dtype = ``linear.weight.dtype``)."""

    @abstractmethod
    def holds(self, module: nn.Module) -> bool:
        """Whether ``module`` was made by this codec."""

    @abstractmethod
    def dequantize(self, module: nn.Module) -> Tensor:
        """The module's weight, ``(out_features, in_features)``, in its compute dtype."""

    @abstractmethod
    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        """Store ``weight`` (``(out, in)``) in ``module`` with its scheme and block size."""

    @abstractmethod
    def storage(self, module: nn.Module) -> list[Tensor]:
        """Every tensor that stores the weight (codes, scales, second-level scales, code tables)."""

    def fake_quantize(self, w: Tensor, scheme: str, block: int) -> Tensor:
        """``dequantize(quantize(w))`` for a 2-D ``w``, in ``w``'s dtype: the numerics without the module."""
        self.check(scheme, block)
        require(w.dim() == 2, "weight", tuple(w.shape), "must be a 2-D (rows, cols) matrix")
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(w.detach().contiguous(), requires_grad=False)
        return self.dequantize(self.quantize(linear, scheme, block)).to(w.dtype)


def _frozen(t: Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


class TorchaoCodec(Codec):
    name = "torchao"
    schemes = ("nf4",)
    shardable = True  # NF4Tensor splits its codes, scales and factors along dim 0
    SCALER_BLOCKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)

    def _nf4(self, w: Tensor, block: int) -> Tensor:
        from torchao.quantization import to_nf4

        n = w.numel()
        if n % block:
            raise LorakitError(f"torchao NF4 needs the weight's {n} values to be a multiple of block={block}; "
                               "use backend='bitsandbytes' (which pads) or another block size")
        n_blocks = n // block
        scaler = next((s for s in self.SCALER_BLOCKS if n_blocks % s == 0), None)
        if scaler is None:
            raise LorakitError(f"torchao NF4's double quantisation needs the {n_blocks} blocks of {tuple(w.shape)} "
                               f"to be a multiple of one of {self.SCALER_BLOCKS}; use backend='bitsandbytes'")
        return to_nf4(w.detach().contiguous(), block, scaler)

    def quantize(self, linear: nn.Linear, scheme: str, block: int) -> nn.Linear:
        self.check(scheme, block)
        out = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        out.weight = _frozen(self._nf4(linear.weight, block))
        out.bias = _frozen(linear.bias)
        return out

    def holds(self, module: nn.Module) -> bool:
        if "torchao" not in sys.modules:  # no NF4 tensor can exist; do not pay for importing torchao
            return False
        from torchao.quantization import NF4Tensor

        return isinstance(module, nn.Linear) and isinstance(getattr(module, "weight", None), NF4Tensor)

    def dequantize(self, module: nn.Module) -> Tensor:
        return module.weight.get_original_weight()

    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        old = module.weight
        module.weight = _frozen(self._nf4(weight.to(old.dtype), old.block_size))

    def storage(self, module: nn.Module) -> list[Tensor]:
        w = module.weight
        return [w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4]


class BitsandbytesCodec(Codec):
    name = "bitsandbytes"
    schemes = ("nf4", "fp4")

    @staticmethod
    def _params(weight: Tensor, scheme: str, block: int, module: nn.Module) -> nn.Parameter:
        import bitsandbytes as bnb

        params = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, blocksize=block,
                                   compress_statistics=True, quant_type=scheme, module=module)
        return params.to(weight.device)  # bitsandbytes quantises when the parameter moves to its device

    def quantize(self, linear: nn.Linear, scheme: str, block: int) -> nn.Linear:
        import bitsandbytes as bnb

        self.check(scheme, block)
        w = linear.weight
        out = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=w.dtype, compress_statistics=True, quant_type=scheme, device="meta")
        out.weight = self._params(w, scheme, block, out)
        out.bias = _frozen(linear.bias)
        # Linear4bit's eval path on AVX512-BF16 CPUs repacks the stored weight in place (bitsandbytes 0.49-0.50),
        # which fails for inputs that are not a whole number of blocks ("shape '[n, 0]' is invalid") and changes
        # what dequantize/requantize read: the stored form stays the one on every machine.
        out.support_avx512bf16_for_cpu = False
        return out

    def holds(self, module: nn.Module) -> bool:
        bnb = sys.modules.get("bitsandbytes")
        return bnb is not None and isinstance(module, bnb.nn.Linear4bit)

    def dequantize(self, module: nn.Module) -> Tensor:
        import bitsandbytes.functional as bf

        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # a Linear4bit made elsewhere, repacked on its eval path
            data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
        return bf.dequantize_4bit(data, state).to(module.compute_dtype or state.dtype)

    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        state = module.weight.quant_state
        module.weight = self._params(weight.to(state.dtype), state.quant_type, state.blocksize, module)

    def storage(self, module: nn.Module) -> list[Tensor]:
        state = module.weight.quant_state
        out = [module.weight.data, state.absmax, state.code]
        if state.nested:
            out += [state.offset, state.state2.absmax, state.state2.code]
        return out


class CodebookCodec(Codec):
    name = "lorakit"
    schemes = codebook.SCHEMES

    def quantize(self, linear: nn.Linear, scheme: str, block: int) -> nn.Linear:
        self.check(scheme, block)
        return codebook.CodebookLinear(linear, scheme, block)

    def holds(self, module: nn.Module) -> bool:
        return isinstance(module, codebook.CodebookLinear)

    def dequantize(self, module: nn.Module) -> Tensor:
        return module.dequantize()

    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        module.set_weight(weight)

    def storage(self, module: nn.Module) -> list[Tensor]:
        return [module.codes, module.absmax]

    def fake_quantize(self, w: Tensor, scheme: str, block: int) -> Tensor:
        self.check(scheme, block)
        codes, absmax = codebook.encode(w, scheme, block)
        return codebook.decode(codes, absmax, scheme, block, w.shape, w.dtype)


CODECS: Registry[Codec] = Registry("quantisation backend")
for _codec in (TorchaoCodec(), BitsandbytesCodec(), CodebookCodec()):
    CODECS.register(_codec.name, _codec)


def codec_of(module: nn.Module) -> Codec | None:
    """The codec that made ``module``, or ``None`` for an ordinary (dense) layer."""
    for name in CODECS.names():
        codec = CODECS.get(name)
        if codec.holds(module):
            return codec
    return None


def storage_bits(module: nn.Module) -> int:
    """Bits that store a quantised module's weight (all codes, scales and tables; not the bias)."""
    codec = codec_of(module)
    if codec is None:
        raise LorakitError(f"{type(module).__name__} is not a quantised layer")
    return sum(t.numel() * t.element_size() * 8 for t in codec.storage(module))


def check_available(name: str) -> Codec:
    """The codec ``name``; a clear error when its library is not installed."""
    codec = CODECS.get(name)
    module = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}.get(name)
    if module is not None:
        try:
            __import__(module)
        except ImportError as exc:
            raise LorakitError(f"quantisation backend {name!r} needs the {module!r} package "
                               f"(pip install 'lorakit[quant]'): {exc}") from None
    return codec

