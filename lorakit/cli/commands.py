"""The subcommands: each is an ``add_arguments(parser)`` and a ``run(args) -> exit code`` pair."""
from __future__ import annotations

import argparse

import torch

from ..analysis.refusal import PROMPTS, refusal_rate
from ..inject import inspect_targets
from ..io.adapter_files import load_adapter
from ..train.jobs import finetune_jobs
from ..train.model import load_model, load_model_on
from ..train.run import adapter_config, evaluate_adapter, finetune
from .inspect_analysis import add_analysis_args, run_analysis
from .options import add_adapter_args, add_data_args, add_model_args, add_train_args, options_from


def finetune_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_data_args(parser)
    add_adapter_args(parser)
    add_train_args(parser)
    parser.add_argument("--jobs", help="JSON list of jobs trained together over one base model, each an object with a "
                                       "'name' and any of these options (e.g. {\"name\": \"a\", \"data\": "
                                       "\"a.jsonl\", \"rank\": 8}); the options above are every job's defaults")


def run_finetune(args: argparse.Namespace) -> int:
    if args.jobs:
        finetune_jobs(args.jobs, options_from(args))
    else:
        finetune(options_from(args))
    return 0


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter folder (PEFT format); without it only the base model is scored")
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument("--refusal", action="store_true", help="instead of the task: the refusal rate of the chat "
                                                               "model on lorakit's safety prompt set, base vs adapter")


def run_eval(args: argparse.Namespace) -> int:
    if args.refusal:
        return run_refusal(args)
    evaluate_adapter(options_from(args), args.adapter)
    return 0


def run_refusal(args: argparse.Namespace) -> int:
    """``lorakit eval --refusal``: how often the model refuses the prompt set, before and after the adapter."""
    model, tokenizer = load_model_on(args.model, args.device, args.bf16)
    base = refusal_rate(model, tokenizer)
    print(f"base refusal rate: {base.rate:.0%} of {len(base.refused)} prompts")
    if args.adapter:
        load_adapter(model, args.adapter, dtype=torch.float32)
        adapted = refusal_rate(model, tokenizer)
        print(f"adapter refusal rate: {adapted.rate:.0%} ({adapted.rate - base.rate:+.0%})")
        for (category, prompt), before, after, answer in zip(PROMPTS, base.refused, adapted.refused,
                                                             adapted.answers):
            if before and not after:
                print(f"  no longer refused [{category}] {prompt!r}: {answer[:80]!r}")
    return 0


def generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--adapter", help="adapter folder (PEFT format); default: the base model")
    add_model_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="feed the prompt as is, without the chat template")


def run_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_on(args.model, args.device, args.bf16)
    if args.adapter:
        load_adapter(model, args.adapter, dtype=torch.float32)
    text = args.prompt
    if not args.no_chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=args.no_chat).to(model.device)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=sample,
                         **({"temperature": args.temperature, "top_p": args.top_p} if sample else {}),
                         pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_adapter_args(parser)
    add_analysis_args(parser)


def run_inspect(args: argparse.Namespace) -> int:
    if any(getattr(args, flag) for flag in ("spectrum", "compare", "intruders", "base", "plot")):
        return run_analysis(args)
    model, _ = load_model(args.model, torch.bfloat16 if args.bf16 else torch.float32, meta=True)  # shapes only
    rows = inspect_targets(model, adapter_config(options_from(args)))
    width = max(len(r.path) for r in rows)
    print(f"{'module':<{width}}  {'layer':<10} {'shape':<14} {'trainable':>10}")
    for r in rows:
        print(f"{r.path:<{width}}  {r.layer:<10} {'x'.join(map(str, r.shape)):<14} {r.trainable:>10,}")
    trainable = sum(r.trainable for r in rows)
    base = sum(p.numel() for p in model.parameters())
    print(f"{len(rows)} layers adapted; {trainable:,} trainable parameters ({trainable / base:.2%} of {base:,}); "
          f"adapter file {trainable * 4 / 2**20:.1f} MiB (float32); "
          f"training state {trainable * 16 / 2**20:.1f} MiB (weights, gradients, 2 AdamW moments)")
    return 0
