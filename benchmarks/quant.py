"""Quantised base (QLoRA, METHODS.md entry 39): step time, weight storage and memory vs LoRA on a dense base.

Variants (LoRA r=16 on all linear layers, adapters in fp32 as ``lorakit finetune`` builds them):
LoRA on an fp32 / bf16 dense base, and QLoRA on an NF4 base (torchao or bitsandbytes) computing in bf16 or fp32.
Every variant runs forward + cross-entropy + backward + fused AdamW in one process, interleaved; the table gives
the median step, the ratio to the bf16 LoRA step (QLoRA's target: <= 1.3x), the storage bits per weight of the
quantised layers, the bytes of every weight of the model, and memory as in :mod:`common` (CUDA peak, or on CPU
saved activations + trainable state).

    python benchmarks/quant.py [--model tiny|smollm2] [--reps 5] [--batch 8] [--seq 128] [--threads 2]

:func:`qlora_model` builds one QLoRA variant for other benchmarks.
"""
from __future__ import annotations

from typing import Callable

import torch
from common import interleaved_medians, peak_bytes, step_parser, tiny_llama
from torch import nn

import lorakit
from lorakit.hosts.codecs import storage_bits
from lorakit.quant.model import bits_per_parameter, quantized_layers

VARIANTS = ("lora-fp32", "lora-bf16", "qlora-torchao-bf16", "qlora-bitsandbytes-bf16", "qlora-torchao-fp32",
            "qlora-bitsandbytes-fp32")


def qlora_model(model: nn.Module, backend: str = "torchao", scheme: str = "nf4", rank: int = 16,
                ) -> tuple[nn.Module, list[nn.Parameter]]:
    """Quantise ``model``'s linear layers (not the head) and add fp32 LoRA ``rank`` on all of them (QLoRA)."""
    lorakit.quantize(model, scheme, backend)
    lorakit.adapt(model, lorakit.LoraConfig(r=rank, alpha=2 * rank), dtype=torch.float32)
    return model, list(lorakit.trainable_parameters(model).values())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every stored weight: quantised layers by their storage, the rest by numel * element size."""
    quantized = quantized_layers(model)
    skip = {id(t) for m in quantized.values() for t in (*m.parameters(), *m.buffers()) if t is not m.bias}
    dense = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if id(t) not in skip)
    return dense + sum(storage_bits(m) // 8 for m in quantized.values())


def load(name: str, dtype: torch.dtype) -> nn.Module:
    if name == "tiny":
        return tiny_llama(dtype=dtype)
    from lorakit.train.model import load_model

    return load_model(None, dtype)[0]


def builder(variant: str, model_name: str) -> Callable[[torch.device], tuple[nn.Module, list[nn.Parameter]]]:
    kind, *rest = variant.split("-")
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32

    def build(device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
        model = load(model_name, dtype).to(device)
        if kind == "qlora":
            return qlora_model(model, rest[0])
        lorakit.adapt(model, lorakit.LoraConfig(r=16, alpha=32), dtype=torch.float32)
        return model, list(lorakit.trainable_parameters(model).values())

    return build


def make_step(model: nn.Module, ids: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = step_parser(__doc__, reps=5, warmup=1)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    built = {v: builder(v, args.model)(device) for v in args.variants.split(",")}
    vocab = next(iter(built.values()))[0].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    steps = {name: make_step(model, ids, params) for name, (model, params) in built.items()}
    medians = interleaved_medians(steps, args.reps, args.warmup, device)
    ref_name = "lora-bf16" if "lora-bf16" in medians else next(iter(medians))
    ref = medians[ref_name]
    print(f"model={args.model} device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} "
          f"reps={args.reps}; x ref = median / median of {ref_name}")
    print(f"{'variant':<26}{'median ms':>11}{'x ref':>9}{'bits/weight':>13}{'weights MB':>12}{'memory MB':>11}")
    for name, (model, params) in built.items():
        bits = f"{bits_per_parameter(model):.3f}" if quantized_layers(model) else "-"
        _, memory = peak_bytes(steps[name], device, params)
        print(f"{name:<26}{medians[name] * 1e3:>11.1f}{medians[name] / ref:>9.3f}{bits:>13}"
              f"{weight_bytes(model) / 2**20:>12.1f}{memory / 2**20:>11.1f}")


if __name__ == "__main__":
    main()
