"""Train-step time and memory: lorakit vs PEFT vs the frozen-base floor (core issue benchmark).

Tiny Llama (vocab 8192, hidden 384, 8 layers), batch 8 x 128 tokens, LoRA / DoRA r=16 on all linear layers.
Every variant runs forward + cross-entropy + backward (+ fused AdamW on its trainable tensors) in the same process,
interleaved, and is reported as a multiple of the frozen-base step (backward through the frozen network, the
floor every adapter method pays).

    python benchmarks/train_step.py [--reps 20] [--device cpu|cuda] [--threads 2]
"""
from __future__ import annotations

import torch
from common import run_steps, step_parser, tiny_llama

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
    args = step_parser(__doc__, reps=20, warmup=3).parse_args()
    medians = run_steps(VARIANTS, args, make_step)
    for method in ("LoRA", "DoRA"):
        print(f"lorakit/PEFT {method} step time: {medians[f'lorakit {method}'] / medians[f'PEFT {method}']:.3f}")


if __name__ == "__main__":
    main()
