"""LoRAPrune (METHODS.md entry 74) against magnitude pruning, on the embedded tweet task (SmolLM2-135M-Instruct).

Every row fine-tunes a LoRA (r=8, alpha 16, all linear layers, ``--steps`` steps) with ``lorakit``'s ``finetune``
and prunes the MLP intermediate channels (structured; attention heads kept) to 20% and 50%:

- ``dense``: no pruning, the reference;
- ``loraprune``: :class:`~lorakit.compress.loraprune.LoraPrune` prunes during the fine-tune, from the LoRA-guided
  importance, in ``--rounds`` rounds ``--interval`` steps apart (default: ``steps // (rounds + 1)``, so a share of
  the steps is left to recover after the last round);
- ``magnitude``: the base's channels of lowest ``sum |W|`` are zeroed once before adapting (the pruned model is
  saved and given to ``finetune`` as ``--model``); the LoRA fine-tune then re-zeroes the pruned rows of ``B`` /
  columns of ``A`` after every step, or the adapter would revive the pruned channels on merging.

"before" is the held-out accuracy of the model ``finetune`` starts from (the pruned base for ``magnitude``), "after"
that of the adapted (and pruned) model. Achieved sparsity is the share of channels whose gate and up rows and down
column are all zero in the merged weight ``W + s B A`` after training. Each row runs in its own process: peak memory
is that process's peak resident set size (``ru_maxrss``), and "base grads" counts the base (non-adapter) tensors
holding a ``.grad`` before any optimizer step, of all the base tensors — LoRAPrune's importance needs no dense
weight gradient, so 0.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/loraprune.py [--steps 45] [--rounds 3] [--eval-size 200] [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lorakit.compress.loraprune import (
    LoraPrune,
    Structure,
    apply_masks,
    find_structures,
    magnitude_importance,
    prune_masks,
)
from lorakit.hooks import TrainingHook, optimized_parameters
from lorakit.train.model import load_model
from lorakit.train.run import Options, finetune

SPARSITIES = (0.2, 0.5)


def mlp_structures() -> list[Structure]:
    """The MLP channels of SmolLM2 (found on its architecture alone; adapting keeps the module paths)."""
    return find_structures(load_model(None, meta=True)[0], heads=False)


class Audit(TrainingHook):
    """Counts base tensors with a gradient before each optimizer step and, after the last step, the share of MLP
    channels that are zero in the merged weights."""

    def __init__(self, structures: Sequence[Structure], steps: int) -> None:
        self.structures, self.steps = list(structures), steps
        self.base_grads, self.base_tensors, self.sparsity = 0, 0, 0.0

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        trained = {id(p) for p in optimized_parameters(optimizer)}
        base = [p for p in model.parameters() if id(p) not in trained]
        self.base_tensors = len(base)
        self.base_grads = max(self.base_grads, sum(p.grad is not None for p in base))

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step == self.steps:
            sums = torch.cat(list(magnitude_importance(model, self.structures, "default").values()))
            self.sparsity = float((sums == 0).float().mean())


class KeepMasks(TrainingHook):
    """Keeps the channels zeroed in the base (found when training begins) zero in the LoRA factors too."""

    def __init__(self, structures: Sequence[Structure]) -> None:
        self.structures = list(structures)
        self.masks: dict[str, torch.Tensor] = {}

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.masks = {k: v > 0 for k, v in magnitude_importance(model, self.structures).items()}

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        apply_masks(model, self.structures, self.masks)


def magnitude_pruned(sparsity: float, folder: Path) -> None:
    """Save the embedded model with ``sparsity`` of its MLP channels (lowest ``sum |W|``) zeroed to ``folder``."""
    model, tokenizer = load_model(None)
    structures = find_structures(model, heads=False)
    apply_masks(model, structures, prune_masks(magnitude_importance(model, structures), sparsity))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune one row in this process; its accuracies, sparsity, base gradients and peak memory."""
    torch.set_num_threads(args.threads)
    structures = mlp_structures()
    audit = Audit(structures, args.steps)
    hooks: list[TrainingHook] = []
    if args.row == "loraprune":
        interval = args.interval or max(1, args.steps // (args.rounds + 1))
        hooks.append(LoraPrune("default", structures, args.sparsity, interval=interval, rounds=args.rounds))
    elif args.row == "magnitude":
        hooks.append(KeepMasks(structures))
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(Options(model=args.model, steps=args.steps, rank=8, alpha=16.0, eval_size=args.eval_size,
                                  output=str(Path(tmp) / "run"), overwrite=True), hooks=[*hooks, audit])
    return {"row": args.row, "sparsity": args.sparsity, "before": result["before"]["accuracy"],
            "after": result["after"]["accuracy"], "achieved": audit.sparsity,
            "base_grads": f"{audit.base_grads} of {audit.base_tensors}",
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": result["seconds"]}


def spawn(args: argparse.Namespace, row: str, sparsity: float, model: Path | None = None) -> dict[str, Any]:
    """Run one row in a fresh process of this script."""
    forwarded = [f"--steps={args.steps}", f"--rounds={args.rounds}", f"--interval={args.interval}",
                 f"--eval-size={args.eval_size}", f"--threads={args.threads}", f"--row={row}", f"--sparsity={sparsity}"]
    if model is not None:
        forwarded.append(f"--model={model}")
    done = subprocess.run([sys.executable, __file__, *forwarded], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"row {row} {sparsity:.0%} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"measured {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def all_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = [spawn(args, "dense", 0.0)]
    for sparsity in SPARSITIES:
        rows.append(spawn(args, "loraprune", sparsity))
        with tempfile.TemporaryDirectory() as tmp:
            magnitude_pruned(sparsity, Path(tmp))
            rows.append(spawn(args, "magnitude", sparsity, Path(tmp)))
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nSmolLM2-135M-Instruct, LoRA r=8 all linear, {args.steps} steps, {args.rounds} LoRAPrune rounds, "
          f"{args.eval_size} held-out tweets, {args.threads} thread(s)\n")
    print("| method | target sparsity | achieved sparsity | accuracy before | accuracy after | peak RSS | "
          "base grads | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['sparsity']:.0%} | {r['achieved']:.1%} | {r['before']:.1%} | {r['after']:.1%} | "
              f"{r['peak'] / 2**20:.0f} MiB | {r['base_grads']} | {r['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--rounds", type=int, default=3, help="LoRAPrune's pruning rounds")
    parser.add_argument("--interval", type=int, default=0, help="steps between rounds (0: steps // (rounds + 1))")
    parser.add_argument("--eval-size", type=int, default=200, help="held-out tweets scored")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (the 2 cores are shared)")
    parser.add_argument("--quick", action="store_true", help="4 steps, 40 held-out tweets: check the script runs")
    parser.add_argument("--row", choices=("dense", "loraprune", "magnitude"), help=argparse.SUPPRESS)
    parser.add_argument("--sparsity", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)  # the magnitude-pruned model folder
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_size = 4, 40
    if args.row:
        print(json.dumps(run_row(args)))
        return
    print_table(all_rows(args), args)


if __name__ == "__main__":
    main()
