"""Every registered method on the benchmark tiny Llama: trainable parameters, train-step time, memory; PEFT beside it.

Tiny Llama (vocab 8192, hidden 384, 8 layers), batch 8 x 128 tokens, each method with its default config on all
linear layers (LoRA-family r=8). Steps (forward + cross-entropy + backward + fused AdamW) are interleaved in one
process and reported as a multiple of the frozen-base step. Where PEFT implements the same method, PEFT's
implementation with the same hyper-parameters runs beside it.

    python benchmarks/methods.py [--reps 5] [--device cpu|cuda] [--threads 2] [--methods kron,randlora]
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from common import interleaved_medians, peak_bytes, tiny_llama
from train_step import frozen_floor, make_step

import lorakit

# lorakit method -> (PEFT config class name, its kwargs) for the same method and hyper-parameters
PEFT_PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", dict(r=8, lora_alpha=8)),
    "dora": ("LoraConfig", dict(r=8, lora_alpha=8, use_dora=True)),
    "kron": ("LoKrConfig", dict(r=8, alpha=8)),
    "bone": ("MissConfig", dict(r=8)),
    "randlora": ("RandLoraConfig", dict(r=32, randlora_alpha=640)),
}

Built = tuple[torch.nn.Module, list[torch.Tensor]]


def ours(method: str) -> Callable[[torch.device], Built]:
    def build(device: torch.device) -> Built:
        model = lorakit.adapt(tiny_llama().to(device), lorakit.build_config(method))
        return model, list(lorakit.trainable_parameters(model).values())
    return build


def theirs(method: str) -> Callable[[torch.device], Built]:
    def build(device: torch.device) -> Built:
        import peft

        cls_name, kwargs = PEFT_PEERS[method]
        config = getattr(peft, cls_name)(target_modules="all-linear", **kwargs)
        model = peft.get_peft_model(tiny_llama().to(device), config)
        return model, [p for p in model.parameters() if p.requires_grad]
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--methods", default="", help="comma-separated subset (default: every registered method)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    methods = args.methods.split(",") if args.methods else lorakit.METHODS.names()

    variants: dict[str, Callable[[torch.device], Built]] = {"frozen base (floor)": frozen_floor}
    for method in methods:
        variants[f"lorakit {method}"] = ours(method)
        if method in PEFT_PEERS:
            variants[f"PEFT {method}"] = theirs(method)
    built = {name: build(device) for name, build in variants.items()}
    steps = {name: make_step(model, ids, params) for name, (model, params) in built.items()}
    medians = interleaved_medians(steps, args.reps, args.warmup, device)
    floor = medians["frozen base (floor)"]

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} reps={args.reps}")
    print(f"{'variant':<22}{'trainable':>12}{'median ms':>11}{'x floor':>9}{'memory MB':>11}  memory measure")
    for name, (_, params) in built.items():
        measure, nbytes = peak_bytes(steps[name], device, params)
        n = sum(p.numel() for p in params)
        print(f"{name:<22}{n:>12,}{medians[name] * 1e3:>11.1f}{medians[name] / floor:>9.3f}{nbytes / 2**20:>11.1f}"
              f"  {measure}")
    for method in methods:
        if method in PEFT_PEERS:
            ratio = medians[f"lorakit {method}"] / medians[f"PEFT {method}"]
            print(f"lorakit/PEFT {method} step time: {ratio:.3f}")


if __name__ == "__main__":
    main()
