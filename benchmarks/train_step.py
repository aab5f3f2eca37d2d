"""Train-step time and memory: lorakit vs PEFT vs the frozen-base floor (core issue benchmark).

Tiny Llama (vocab 8192, hidden 384, 8 layers), batch 8 x 128 tokens, LoRA / DoRA r=16 on all linear layers.
Every variant runs forward + cross-entropy + backward (+ fused AdamW on its trainable tensors) in the same process,
interleaved, and is reported as a multiple of the frozen-base step (backward through the frozen network, the
floor every adapter method pays).

    python benchmarks/train_step.py [--reps 20] [--device cpu|cuda] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch
from common import interleaved_medians, peak_bytes, tiny_llama

import lorakit


def make_step(model: torch.nn.Module, ids: torch.Tensor, params: list[torch.Tensor]):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def frozen_floor(device: torch.device):
    model = tiny_llama().to(device)
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return model, []


def full_finetune(device: torch.device):
    model = tiny_llama().to(device)
    return model, list(model.parameters())


def ours(dora: bool):
    def build(device: torch.device):
        cls = lorakit.DoraConfig if dora else lorakit.LoraConfig
        model = lorakit.adapt(tiny_llama().to(device), cls(r=16, alpha=32))
        return model, list(lorakit.trainable_parameters(model).values())
    return build


def peft_model(dora: bool):
    def build(device: torch.device):
        import peft

        model = peft.get_peft_model(tiny_llama().to(device), peft.LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", use_dora=dora))
        return model, [p for p in model.parameters() if p.requires_grad]
    return build


VARIANTS = {
    "frozen base (floor)": frozen_floor,
    "full fine-tuning": full_finetune,
    "lorakit LoRA": ours(False),
    "PEFT LoRA": peft_model(False),
    "lorakit DoRA": ours(True),
    "PEFT DoRA": peft_model(True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    built = {name: build(device) for name, build in VARIANTS.items()}
    steps = {name: make_step(model, ids, params) for name, (model, params) in built.items()}
    medians = interleaved_medians(steps, args.reps, args.warmup, device)
    floor = medians["frozen base (floor)"]
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} reps={args.reps}")
    print(f"{'variant':<22}{'median ms':>11}{'x floor':>9}{'memory MB':>11}  memory measure")
    for name, (_, params) in built.items():
        measure, nbytes = peak_bytes(steps[name], device, params)
        print(f"{name:<22}{medians[name] * 1e3:>11.1f}{medians[name] / floor:>9.3f}{nbytes / 2**20:>11.1f}  {measure}")
    for method in ("LoRA", "DoRA"):
        print(f"lorakit/PEFT {method} step time: {medians[f'lorakit {method}'] / medians[f'PEFT {method}']:.3f}")


if __name__ == "__main__":
    main()
