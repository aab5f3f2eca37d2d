"""Argument groups shared by the subcommands, and their translation into :class:`lorakit.train.run.Options`."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..init import INITS
from ..methods.base import METHODS
from ..optim import OPTIMIZERS
from ..train.mixture import MIXTURES
from ..train.options import DEFAULT_STEPS, Options
from ..train.tasks import TASKS
from ..train.trained import FULL

_DEFAULTS = Options()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="transformers model folder or .gguf file (default: the embedded "
                                       "SmolLM2-135M-Instruct)")
    group.add_argument("--device", default=_DEFAULTS.device,
                       help="auto (default: the GPU when there is one, under torchrun this process's), cpu, cuda, "
                            "cuda:<index> or mps")
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="load the base model in bfloat16 (adapters stay float32); default: on a GPU with fast "
                            "bf16, float32 elsewhere")
    group.add_argument("--quant", help="quantise the frozen base's linear layers: nf4 (QLoRA), fp4 (bitsandbytes), "
                                       "nf2/nf3/int2..int8 (--quant-backend lorakit)")
    group.add_argument("--quant-backend", default=_DEFAULTS.quant_backend,
                       help="bitsandbytes (default), torchao or lorakit")


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter")
    group.add_argument("--method", default=_DEFAULTS.method, choices=[*METHODS.names(), FULL, *MIXTURES],
                       help="adapter method, 'full' to train every weight (e.g. with --optimizer galore or --lisa), "
                            "or a mixture of LoRA experts: mixlora (FFN experts, top-k router) or xlora (frozen "
                            "--experts, trained scalings head)")
    group.add_argument("--rank", type=int, default=_DEFAULTS.rank, help="adapter rank r")
    group.add_argument("--alpha", type=float, default=_DEFAULTS.alpha, help="scale numerator (update * alpha / r)")
    group.add_argument("--targets", default=_DEFAULTS.targets,
                       help="'all-linear', comma-separated module names (q_proj,v_proj) or a regex over module paths")
    group.add_argument("--init", help="initialiser of the adapter's factors (default: the method's own), e.g. "
                                      f"{', '.join(INITS.names())}; data-driven ones run on the first "
                                      "--init-batches training batches")
    group.add_argument("--init-batches", type=int, default=_DEFAULTS.init_batches,
                       help="training batches a data-driven initialiser sees")
    group.add_argument("--method-option", dest="method_options", action=KeyValue, default={}, metavar="KEY=VALUE",
                       help="another config field of the method, repeatable; values are JSON (e.g. "
                            "sparse_lambda=0.1 for sora, target_r=8 for adalora / increlora, r_min=2 for dylora, "
                            "experts=8 top_k=2 for mixlora)")
    group.add_argument("--experts", dest="experts", action=KeyValue, default={}, metavar="NAME=FOLDER",
                       help="--method xlora: an adapter folder (PEFT or lorakit) loaded as frozen expert NAME, "
                            "repeatable")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", help=".jsonl / .csv / .txt file or a datasets folder (default: the embedded "
                                      "sentiment-labelled tweets)")
    group.add_argument("--task", choices=TASKS,
                       help="default: classification for the embedded data, causal-lm otherwise")
    group.add_argument("--text-column", help="text column (sft: the prompt column); default 'text' ('prompt' for sft)")
    group.add_argument("--label-column", default=_DEFAULTS.label_column, help="classification label column")
    group.add_argument("--response-column", default=_DEFAULTS.response_column,
                       help="sft response column (rows with a 'messages' list use it instead)")
    group.add_argument("--prompt-template", help="classification prompt containing {text}; "
                                                  "default 'Text: {text}\\nLabel:' ('{text}\\nSentiment:' "
                                                  "for the embedded data)")
    group.add_argument("--max-length", type=int, default=_DEFAULTS.max_length, help="tokens per example (truncated)")
    group.add_argument("--eval-size", type=int, help="held-out examples (default min(200, 10%%))")
    group.add_argument("--eval-batch-size", type=int, default=_DEFAULTS.eval_batch_size)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    length = group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=float, help="passes over the training examples instead of --steps")
    group.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate (linear warmup/decay)")
    group.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                       help="examples per micro-batch, over all processes")
    group.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum,
                       help="micro-batches per optimizer step (global batch = batch-size * grad-accum)")
    group.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    group.add_argument("--optimizer", default=_DEFAULTS.optimizer, choices=OPTIMIZERS.names(),
                       help="update rule (galore / fira / natural-galore: low-rank optimizer states)")
    group.add_argument("--optimizer-option", dest="optimizer_options", action=KeyValue, default={},
                       metavar="KEY=VALUE", help="an option of the optimizer, repeatable; values are JSON "
                                                 "(e.g. rank=64, update_gap=200, per_layer=true, betas=[0.9,0.95])")
    group.add_argument("--lisa", action="store_true", help="LISA: train --lisa-layers sampled blocks at a time "
                                                          "(embeddings and head always), redrawn every --lisa-interval")
    group.add_argument("--lisa-layers", type=int, default=_DEFAULTS.lisa_layers, help="LISA's gamma")
    group.add_argument("--lisa-interval", type=int, default=_DEFAULTS.lisa_interval, help="LISA's K (steps)")
    group = parser.add_argument_group("output")
    group.add_argument("--output", help="run folder (default runs/finetune-<time>)")
    group.add_argument("--save-every", type=int, default=_DEFAULTS.save_every,
                       help="checkpoint every N steps (0: only on Ctrl-C)")
    group.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the frozen base over the processes (FSDP2) for bases that do not "
                            "fit one device; the adapter is replicated, as in data parallelism")
    group.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --output")


class KeyValue(argparse.Action):
    """``--x key=value`` (repeatable) into a dict; the value is read as JSON when it parses, else kept as text."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        key, sep, text = str(values).partition("=")
        if not sep or not key.isidentifier():
            raise argparse.ArgumentError(self, f"expected KEY=VALUE with KEY an identifier, got {values!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        setattr(namespace, self.dest, {**getattr(namespace, self.dest), key: value})


def options_from(args: argparse.Namespace) -> Options:
    """The :class:`Options` named by ``args`` (options a subcommand does not take keep their defaults)."""
    given = vars(args)
    return Options(**{f.name: given[f.name] for f in dataclasses.fields(Options) if f.name in given})
