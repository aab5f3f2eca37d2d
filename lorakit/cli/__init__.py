"""``lorakit`` command line: one table maps each subcommand to its arguments and its function.

    lorakit finetune            # the embedded default: SmolLM2 sentiment on tweets, before vs after
    lorakit generate --prompt "Hello" [--adapter runs/x]
    lorakit eval --adapter runs/x
    lorakit inspect --rank 8 --targets q_proj,v_proj
    lorakit merge runs/a runs/b --weights 0.7 0.3 --rule ties --rank 16 --output merged/
    lorakit extract --model runs/full --rank 16 --output lora/
    lorakit compress --rank-ratio 0.4 --method activation --output smollm2-lord/
    lorakit federate --clients 8 --rounds 10 --aggregator fed-sb --partition dirichlet:0.3
    lorakit continual --method lae                    # tweets, shakespeare, dialogue in sequence: accuracy matrix
    torchrun --nproc-per-node 2 -m lorakit finetune ...           # data parallel (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 8 -m lorakit finetune --fsdp ...    # the frozen base sharded (FSDP2)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import LorakitError
from ..serve import cli as serve_cli
from . import commands, compress, continual, federate, merge


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "finetune": Command("fine-tune an adapter, evaluating before and after (no arguments: the embedded default)",
                        commands.finetune_arguments, commands.run_finetune),
    "generate": Command("generate text with the base model or an adapter", commands.generate_arguments,
                        commands.run_generate),
    "eval": Command("score the base model and an adapter on the held-out split", commands.eval_arguments,
                    commands.run_eval),
    "inspect": Command("show what an adapter config would adapt and what it costs; with --spectrum, what a trained "
                       "update changed (spectra, effective rank, intruder dimensions, subspace similarity)",
                       commands.inspect_arguments,
                       commands.run_inspect),
    "serve": Command("serve the base model and adapters over an OpenAI-compatible HTTP API",
                     serve_cli.serve_arguments, serve_cli.run_serve),
    "merge": Command("merge adapters into one LoRA (cat, linear, svd, ties, dare, ...)", merge.merge_arguments,
                     merge.run_merge),
    "compress": Command("factor a model's linear layers into low-rank pairs (LORD; svd, activation-aware or "
                        "Fisher-weighted) and save it as a loadable folder", compress.compress_arguments,
                        compress.run_compress),
    "federate": Command("federated fine-tuning over simulated clients (Flower; FedAvg, FFA-LoRA, Fed-SB, FLoRA, "
                        "FedSVD, LoRA-FAIR; DP-SGD)", federate.federate_arguments, federate.run_federate),
    "continual": Command("learn a sequence of tasks (sequential, LAE, CoDyRA, AlignGuard) and unlearn some (O3, "
                         "GS-LoRA): accuracy matrix, average accuracy, forgetting", continual.continual_arguments,
                         continual.run_continual),
    "extract": Command("extract a LoRA from a fully fine-tuned model's difference to its base",
                       merge.extract_arguments, merge.run_extract),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank adaptation toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (2: bad input, explained on stderr; 130: interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LorakitError as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
