"""Mixtures of LoRA experts, side by side with their peers, in one process.

(1) X-LoRA with 8 LoRA experts (r=8 on q,k,v,o) on SmolLM2-135M (fp32): lorakit (``xlora_forward``) vs PEFT's
    ``XLoraModel`` with the same expert folders and the same head tensors; forward (no grad) and a train step of the
    head (forward + backward), both as multiples of the plain base forward. Outputs are checked equal first. The
    ``one pass`` column is lorakit's single-pass alternative (a gate router on each layer's input,
    ``lorakit.gate_router``): other outputs, not the paper's variant, shown for its cost.
(2) MixLoRA on SmolLM2-135M: every FFN a mixture of 8 LoRA experts (r=8 on gate/up/down), top-2: the sparse
    dispatch (2 FFN rows per token, grouped LoRA products) vs the dense loop over the 8 experts (8 FFN rows per
    token); forward and train step, outputs checked equal first.

    python benchmarks/mixtures.py                 # both, batch 4 x 64 tokens
    python benchmarks/mixtures.py --only xlora --batch 2 --tokens 128
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import torch
from common import interleaved_medians
from torch import nn

import lorakit
from lorakit.mixtures.block import ExpertBlock, add_expert_blocks
from lorakit.mixtures.files import load_experts
from lorakit.mixtures.xlora import xlora_forward, xlora_head

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def smollm2() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from lorakit.train.default import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def expert_folders(n: int, root: Path) -> dict[str, str]:
    """``n`` random rank-8 PEFT LoRA folders of SmolLM2 named "0".."n-1" (PEFT's X-LoRA loads experts by index)."""
    from peft import LoraConfig, get_peft_model

    folders = {}
    for i in range(n):
        model = get_peft_model(smollm2(), LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION,
                                                     init_lora_weights=False))
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / str(i))
        folders[str(i)] = str(root / str(i))
    return folders


def ratios(steps: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    medians = interleaved_medians(steps, reps=reps, warmup=1, device=torch.device("cpu"))
    return {k: v / medians["base"] for k, v in medians.items()} | {"base_s": medians["base"]}


def bench_xlora(ids: torch.Tensor, reps: int) -> None:
    from peft import XLoraConfig, get_peft_model

    with tempfile.TemporaryDirectory() as tmp:
        folders = expert_folders(8, Path(tmp))
        theirs = get_peft_model(smollm2(), XLoraConfig(task_type="CAUSAL_LM", hidden_size=576, adapters=folders,
                                                       layerwise_scalings=True, xlora_dropout_p=0.0))
        ours = smollm2()
        names = load_experts(ours, {f"e{k}": v for k, v in folders.items()})
    classifier = theirs.base_model.internal_xlora_classifier
    head = lorakit.add_router(ours, "xlora", xlora_head(ours, names, layerwise=True))
    head.load_peft_state(classifier.state_dict())
    base = smollm2()
    with torch.no_grad():
        diff = (xlora_forward(ours, head, input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    print(f"X-LoRA, 8 experts r=8 on {','.join(ATTENTION)}, layer-wise head; max |logits lorakit - PEFT| = "
          f"{diff:.2e}")

    def no_grad(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()
        return run

    def train(fn: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> Callable[[], None]:
        def run() -> None:
            fn().logits.float().square().mean().backward()
            for p in params:
                p.grad = None
        return run

    gate = lorakit.add_router(ours, "gate", lorakit.gate_router(ours, names))  # one pass: not the paper's variant

    def one_pass() -> torch.Tensor:
        with lorakit.mix(ours, names, gate):
            return ours(ids)

    head_params, gate_params = list(head.parameters()), list(gate.parameters())
    their_params = list(classifier.parameters())
    forward = ratios({"base": no_grad(lambda: base(ids)), "lorakit": no_grad(lambda: xlora_forward(
        ours, head, input_ids=ids)), "peft": no_grad(lambda: theirs(input_ids=ids)), "one pass": no_grad(one_pass)},
        reps)
    step = ratios({"base": no_grad(lambda: base(ids)), "lorakit": train(lambda: xlora_forward(
        ours, head, input_ids=ids), head_params), "peft": train(lambda: theirs(input_ids=ids), their_params),
        "one pass": train(one_pass, gate_params)}, reps)
    print(f"{'':<14}{'lorakit':>10}{'PEFT':>10}{'lorakit/PEFT':>14}{'one pass':>10}{'one pass/PEFT':>15}   "
          f"(x base forward {forward['base_s'] * 1e3:.0f} ms)")
    for label, r in (("forward", forward), ("train step", step)):
        print(f"{label:<14}{r['lorakit']:>10.2f}{r['peft']:>10.2f}{r['lorakit'] / r['peft']:>14.2f}"
              f"{r['one pass']:>10.2f}{r['one pass'] / r['peft']:>15.2f}")


def set_dispatch(model: nn.Module, dispatch: str) -> None:
    for block in model.modules():
        if isinstance(block, ExpertBlock):
            block.dispatch = dispatch


def bench_mixlora(ids: torch.Tensor, reps: int) -> None:
    model = smollm2()
    router = add_expert_blocks(model, "moe", lorakit.LoraConfig(r=8, alpha=16, targets=["gate_proj", "up_proj",
                                                                                       "down_proj"]), 8, top_k=2)
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.normal_(0, 0.02)
        for p in router.parameters():
            p.normal_(0, 0.5)
    base = smollm2()
    outputs = {}
    for dispatch in ("sparse", "dense"):
        set_dispatch(model, dispatch)
        with torch.no_grad():
            outputs[dispatch] = model(ids).logits
    diff = (outputs["sparse"] - outputs["dense"]).abs().max().item()
    print(f"\nMixLoRA, 8 experts top-2, r=8 on gate/up/down of all 30 FFNs; max |logits sparse - dense| = {diff:.2e}")
    params = list(lorakit.trainable_parameters(model).values())

    def run(dispatch: str, grad: bool) -> Callable[[], None]:
        def step() -> None:
            set_dispatch(model, dispatch)
            if not grad:
                with torch.no_grad():
                    model(ids)
                return
            model(ids).logits.square().mean().backward()
            for p in params:
                p.grad = None
        return step

    def base_forward() -> None:
        with torch.no_grad():
            base(ids)

    forward = ratios({"base": base_forward, "sparse": run("sparse", False), "dense": run("dense", False)}, reps)
    step = ratios({"base": base_forward, "sparse": run("sparse", True), "dense": run("dense", True)}, reps)
    print(f"{'':<14}{'sparse':>10}{'dense loop':>12}{'dense/sparse':>14}   (x base forward "
          f"{forward['base_s'] * 1e3:.0f} ms)")
    for label, r in (("forward", forward), ("train step", step)):
        print(f"{label:<14}{r['sparse']:>10.2f}{r['dense']:>12.2f}{r['dense'] / r['sparse']:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", choices=["xlora", "mixlora"])
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.tokens))
    if args.only in (None, "xlora"):
        bench_xlora(ids, args.reps)
    if args.only in (None, "mixlora"):
        bench_mixlora(ids, args.reps)


if __name__ == "__main__":
    main()
