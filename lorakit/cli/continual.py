"""``lorakit continual``: learn a sequence of classification tasks with a continual-learning method, optionally
unlearn some, and report the accuracy matrix (task i after stage j), average accuracy and forgetting.

    lorakit continual                                               # embedded: tweets, shakespeare, dialogue
    lorakit continual --method lae --method-option momentum=0.95
    lorakit continual --tasks a.jsonl,b.jsonl --method codyra --method-option sparsity=1.2
    lorakit continual --method joint --unlearn o3 --forget dialogue  # unlearn a task after learning them all
"""
from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.files import write_json
from .options import KeyValue

DEFAULT_TASKS = "tweets,shakespeare,dialogue"


def continual_arguments(parser: argparse.ArgumentParser) -> None:
    from ..continual import LEARNERS, UNLEARNERS

    parser.add_argument("--model", help="transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help="comma-separated embedded task names (tweets, shakespeare, dialogue) or files with "
                             "text and label columns, learned in this order")
    parser.add_argument("--method", default="sequential", choices=LEARNERS.names())
    parser.add_argument("--method-option", dest="method_options", action=KeyValue, default={}, metavar="KEY=VALUE",
                        help="an option of the method, e.g. momentum=0.95 (lae), sparsity=1.2 (codyra), "
                             "top_k=8 (alignguard)")
    parser.add_argument("--unlearn", choices=UNLEARNERS.names(), help="unlearning method for --forget")
    parser.add_argument("--unlearn-option", dest="unlearn_options", action=KeyValue, default={},
                        metavar="KEY=VALUE", help="an option of the unlearning method, e.g. orthogonal_weight=1")
    parser.add_argument("--forget", default="", help="comma-separated task names to unlearn after learning all")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per task and per unlearning request")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated layer names or all-linear")
    parser.add_argument("--train-size", type=int, default=240, help="training examples per task")
    parser.add_argument("--eval-size", type=int, default=120, help="held-out examples per task")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="folder for matrix.json (default runs/continual-<time>)")


def _build(registry, name: str, options: dict, adapter, settings):  # noqa: ANN001, ANN202 - a registry entry
    cls = registry.get(name)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "adapter", "settings")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; allowed: {allowed}")
    return cls(adapter, settings, **options)


def run_continual(args: argparse.Namespace) -> int:
    from ..continual import LEARNERS, UNLEARNERS, AdapterSettings, FitSettings, load_tasks, run_sequence
    from ..continual.gs_lora import FFN_TARGETS
    from ..train.model import load_model

    for flag in ("steps", "batch_size", "train_size", "eval_size", "max_length"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    forget = [f for f in args.forget.split(",") if f]
    if args.unlearn and not forget:
        raise ConfigError("--unlearn needs --forget TASK[,TASK]")
    torch.manual_seed(args.seed)
    tasks = load_tasks([t for t in args.tasks.split(",") if t], args.train_size, args.eval_size, args.seed)
    targets = "all-linear" if args.targets == "all-linear" else tuple(args.targets.split(","))
    adapter = AdapterSettings(rank=args.rank, alpha=args.alpha, targets=targets)
    settings = FitSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    learner = _build(LEARNERS, args.method, args.method_options, adapter, settings)
    unlearner = None
    if args.unlearn:
        ffn = AdapterSettings(rank=args.rank, alpha=args.alpha, targets=FFN_TARGETS)
        unlearner = _build(UNLEARNERS, args.unlearn, args.unlearn_options,
                           ffn if args.unlearn == "gs-lora" else adapter, settings)
    model, tokenizer = load_model(args.model)
    output = Path(args.output or f"runs/continual-{time.strftime('%Y%m%d-%H%M%S')}")
    _, matrix = run_sequence(model, tokenizer, tasks, learner, unlearner, forget, args.max_length)
    print(matrix.table())
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "matrix.json", {"method": args.method, "unlearn": args.unlearn, **matrix.to_dict()})
    print(f"wrote {output / 'matrix.json'}")
    return 0
