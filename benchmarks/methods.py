"""Every registered method on the benchmark tiny Llama: trainable parameters, train-step time, memory; PEFT beside it.

Tiny Llama (vocab 8192, hidden 384, 8 layers), batch 8 x 128 tokens, each method with its default config on all
linear layers (LoRA-family r=8). Steps (forward + cross-entropy + backward + fused AdamW) are interleaved in one
process and reported as a multiple of the frozen-base step. Where PEFT implements the same method, PEFT's
implementation with the same hyper-parameters runs beside it.

    python benchmarks/methods.py [--reps 5] [--device cpu|cuda] [--threads 2] [--methods kron,randlora]
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from common import Built, run_steps, step_parser, tiny_llama
from train_step import frozen_floor, make_step

import lorakit

# lorakit method -> (PEFT config class name, its kwargs) for the same method and hyper-parameters
PEFT_PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", dict(r=8, lora_alpha=8)),
    "dora": ("LoraConfig", dict(r=8, lora_alpha=8, use_dora=True)),
    "kron": ("LoKrConfig", dict(r=8, alpha=8)),
    "bone": ("MissConfig", dict(r=8)),
    "randlora": ("RandLoraConfig", dict(r=32, randlora_alpha=640)),
    "adalora": ("AdaLoraConfig", dict(init_r=8, target_r=4, lora_alpha=8, total_step=1000)),
}


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
    parser = step_parser(__doc__, reps=5, warmup=1)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: every registered method)")
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else lorakit.METHODS.names()
    device = torch.device(args.device)
    variants: dict[str, Callable[[torch.device], Built]] = {"frozen base (floor)": frozen_floor}
    left_out: dict[str, str] = {}
    for method in methods:
        try:  # built here so that a method whose default config does not fit this model is reported, not fatal
            built = ours(method)(device)
        except lorakit.LorakitError as exc:
            left_out[method] = str(exc)
            continue
        variants[f"lorakit {method}"] = lambda _device, built=built: built
        if method in PEFT_PEERS:
            variants[f"PEFT {method}"] = theirs(method)
    medians = run_steps(variants, args, make_step)
    for method in methods:
        if method in PEFT_PEERS and method not in left_out:
            print(f"lorakit/PEFT {method} step time: {medians[f'lorakit {method}'] / medians[f'PEFT {method}']:.3f}")
    for method, reason in left_out.items():
        print(f"not in the table: {method} (its default config does not fit this model: {reason})")


if __name__ == "__main__":
    main()
