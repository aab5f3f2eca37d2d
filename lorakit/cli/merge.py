"""``lorakit merge`` and ``lorakit extract``: adapter algebra and LoRA extraction from the command line.

    lorakit merge runs/a runs/b runs/c --weights 0.5 0.3 0.2 --rule ties --rank 16 --output merged/
    lorakit extract --model runs/full --base HuggingFaceTB/SmolLM2-135M-Instruct --rank 16 --output lora/

Both write a PEFT LoRA folder (per-layer ranks) that PEFT, ``lorakit serve`` and ``lorakit eval`` load, and print
the error each layer's result makes.
"""
from __future__ import annotations

import argparse
import math

import torch

from ..errors import LorakitError
from ..io.adapter_files import load_adapter, save_adapter
from ..merging.extract import extract_lora
from ..merging.model import merge_adapters
from ..merging.rules import MERGE_RULES
from ..train.model import load_model

MERGED = "merged"


def merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", help="adapter folders (PEFT or lorakit format) on the same base")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1 each; negative: "
                                                                  "task negation)")
    parser.add_argument("--rule", default="cat", choices=MERGE_RULES.names(),
                        help="cat (exact), linear, svd, ties, dare_linear, dare_ties, magnitude_prune, lego")
    parser.add_argument("--rank", type=int, help="truncate every layer's result to this rank (SVD)")
    parser.add_argument("--energy", type=float, help="keep the fewest directions holding this share of each layer's "
                                                      "squared norm")
    parser.add_argument("--density", type=float, help="ties / dare / magnitude_prune: share of entries kept")
    parser.add_argument("--seed", type=int, help="dare / lego: the seed of the random drop / the clustering")
    parser.add_argument("--units", type=int, help="lego: rank-wise units of the merged adapter (default: the largest "
                                                   "input rank)")
    parser.add_argument("--model", help="the base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output", required=True, help="folder of the merged adapter")


def run_merge(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model, torch.float32)
    names = [f"input{i}" for i in range(len(args.adapters))]
    for name, folder in zip(names, args.adapters):
        load_adapter(model, folder, name, activate=False)
    options = {k: v for k, v in (("density", args.density), ("seed", args.seed), ("units", args.units))
               if v is not None}
    report = merge_adapters(model, names, args.weights, rule=args.rule, into=MERGED, rank=args.rank,
                            energy=args.energy, **options)
    save_adapter(model, args.output, MERGED)
    ranks = sorted(set(report.ranks.values()))
    print(f"merged {len(names)} adapters by {args.rule!r} over {len(report.ranks)} layers (ranks "
          f"{ranks[0]}..{ranks[-1]}); largest relative error to the rule's result {report.worst_rule_error:.2e}, "
          f"to the weighted sum of the updates {report.worst_sum_error:.2e}; saved to {args.output}")
    return 0


def extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the fully fine-tuned model (e.g. `lorakit finetune --method "
                                                       "full` output)")
    parser.add_argument("--base", help="the model it was fine-tuned from (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank per layer")
    parser.add_argument("--energy", type=float, help="or: the fewest directions holding this share of each layer's "
                                                      "squared difference (with --rank: whichever is smaller)")
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
    parser.add_argument("--output", required=True, help="folder of the extracted LoRA")


def run_extract(args: argparse.Namespace) -> int:
    finetuned, _ = load_model(args.model, torch.float32)
    base, _ = load_model(args.base, torch.float32)
    targets = args.targets if args.targets == "all-linear" else tuple(t for t in args.targets.split(",") if t)
    report = extract_lora(finetuned, base, rank=args.rank, energy=args.energy, targets=targets)
    save_adapter(base, args.output)
    worst = max(report.errors.values())
    if not math.isfinite(worst):
        raise LorakitError("the extracted factors are not finite; check both models load correctly")
    print(f"extracted a LoRA of {len(report.ranks)} layers (ranks {min(report.ranks.values())}.."
          f"{max(report.ranks.values())}); largest relative error {worst:.2e}; saved to {args.output}")
    if report.other_differences:
        print(f"note: {len(report.other_differences)} other tensors differ and are not in the LoRA, e.g. "
              f"{report.other_differences[:3]}")
    return 0
