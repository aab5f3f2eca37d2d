"""Rank allocation on the embedded task: held-out accuracy vs trainable parameters for LoRA at fixed ranks, SoRA,
DyLoRA (every rank from one run), IncreLoRA and AdaLoRA, and the training time DyLoRA saves over training each rank
separately.

Every variant fine-tunes SmolLM2-135M-Instruct on the embedded tweet-sentiment task through ``lorakit finetune``'s
own code path (``finetune``: the method's training hooks come from the method), same steps, batch size, learning
rate, targets (all linear layers) and schedule. Parameters are counted from the saved adapter file, so pruned
(SoRA, AdaLoRA) and grown (IncreLoRA) ranks count as they end. DyLoRA is trained once at ``r = 16`` and then
evaluated at ``b = 4, 8, 16`` from the same adapter; its training time is compared with the sum of the LoRA runs
at those ranks (measured) and with one LoRA run per rank of its whole range 1..16 (estimated from the mean LoRA
time). Training time is the sum of the step times the trainer logs (no model loading or evaluation).

    python benchmarks/rank.py [--steps 30] [--seeds 3] [--eval-size 100] [--out rank.json]

Each variant runs on seeds ``0..seeds-1`` (the seed draws the initial factors, the data order and the held-out
split stays fixed); the table gives mean ± standard deviation over seeds. Results are appended to ``--out`` as each
run ends (a rerun skips the runs already there).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lorakit.io.adapter_files import load_adapter
from lorakit.rank.dylora import at_rank
from lorakit.train.checkpoint import METRICS_FILE, MetricsLog
from lorakit.train.evaluate import evaluate
from lorakit.train.run import Options, finetune, prepare

LAYERS = 30 * 7  # SmolLM2-135M: 30 blocks x 7 linear layers (all-linear)
DYLORA_RANKS = (4, 8, 16)


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    rank: int
    options: dict[str, Any] = field(default_factory=dict)


def variants(steps: int, sora_lambda: float) -> list[Variant]:
    grow_every = 2
    growths = max(1, int(0.7 * steps) // grow_every)  # IncreLoRA reaches its budget by ~70% of training
    return [
        Variant("LoRA r=4", "lora", 4),
        Variant("LoRA r=8", "lora", 8),
        Variant("LoRA r=16", "lora", 16),
        Variant(f"SoRA (r=16 start, λ={sora_lambda:g})", "sora", 16, {"sparse_lambda": sora_lambda}),
        Variant("DyLoRA (r=16, b~U[1,16])", "dylora", 16),
        Variant("IncreLoRA (r=2 -> 8 avg)", "increlora", 2,
                {"target_r": 8, "grow_every": grow_every, "grow_layers": math.ceil(6 * LAYERS / growths)}),
        Variant("AdaLoRA (r=12 -> 8 avg)", "adalora", 12, {"target_r": 8}),
    ]


def adapter_params(folder: Path) -> int:
    return sum(t.numel() for k, t in load_file(folder / "adapter_model.safetensors").items()
               if not k.endswith("lora_scale"))


def train_seconds(folder: Path) -> float:
    return sum(r["seconds"] for r in MetricsLog(folder / METRICS_FILE).read() if r["kind"] == "step")


def options(variant: Variant, seed: int, args: argparse.Namespace, output: Path) -> Options:
    return Options(method=variant.method, rank=variant.rank, alpha=2.0 * variant.rank, lr=args.lr, seed=seed,
                   steps=args.steps, batch_size=args.batch_size, eval_size=args.eval_size,
                   method_options=variant.options, output=str(output))


def run_one(variant: Variant, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        opts = options(variant, seed, args, Path(tmp) / "run")
        result = finetune(opts)
        folder = Path(opts.output)
        row = {"variant": variant.name, "seed": seed, "accuracy": result["after"]["accuracy"],
               "loss": result["after"]["loss"],
               "before_accuracy": result["before"]["accuracy"], "params": adapter_params(folder),
               "train_seconds": train_seconds(folder)}
        if variant.method == "dylora":
            prepared = prepare(opts)
            load_adapter(prepared.model, folder)
            row["at_rank"] = {}
            for b in DYLORA_RANKS:
                with at_rank(prepared.model, b):
                    metrics = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size,
                                       desc=f"eval b={b}")
                row["at_rank"][b] = {"accuracy": metrics["accuracy"], "params": row["params"] * b // variant.rank}
    return row


def spread(values: list[float], fmt: str) -> str:
    """``mean ± standard deviation`` (just the value for one seed)."""
    mean = format(statistics.fmean(values), fmt)
    return mean if len(values) == 1 else f"{mean} ± {format(statistics.stdev(values), fmt)}"


def by_variant(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each variant in first-seen order (rows written before seeds existed are seed 0)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(r["variant"], []).append(r)
    return grouped


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | seeds | trainable params (end) | held-out acc | held-out loss | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    grouped = by_variant(rows)
    for name, runs in grouped.items():
        lines.append(f"| {name} | {len(runs)} | {spread([r['params'] for r in runs], ',.0f')} "
                     f"| {spread([100 * r['accuracy'] for r in runs], '.1f')}% "
                     f"| {spread([r['loss'] for r in runs], '.4f')} "
                     f"| {statistics.fmean(r['train_seconds'] for r in runs):.0f} |")
        for b in runs[0].get("at_rank", {}):
            at_b = [r["at_rank"][b] for r in runs]
            lines.append(f"| &nbsp;&nbsp;DyLoRA evaluated at b={b} (same adapter) | {len(runs)} "
                         f"| {at_b[0]['params']:,} | {spread([100 * m['accuracy'] for m in at_b], '.1f')}% | | |")
    lora = {name: statistics.fmean(r["train_seconds"] for r in runs) for name, runs in grouped.items()
            if name.startswith("LoRA r=")}
    dy = next((runs for name, runs in grouped.items() if name.startswith("DyLoRA")), None)
    if dy is not None and len(lora) == len(DYLORA_RANKS):
        dy_seconds = statistics.fmean(r["train_seconds"] for r in dy)
        separate = sum(lora.values())
        full_range = 16 * separate / len(lora)
        lines.append(f"\nDyLoRA time saved: one run ({dy_seconds:.0f} s) vs LoRA at r = 4, 8, 16 trained "
                     f"separately ({separate:.0f} s): x{separate / dy_seconds:.2f}; vs every rank of its "
                     f"range 1..16 (16 runs, estimated {full_range:.0f} s): x{full_range / dy_seconds:.1f}")
    if rows:
        lines.append(f"\nbase model before training: {100 * rows[0]['before_accuracy']:.1f}% held-out accuracy")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds 0..N-1")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start at this seed (another process may run the earlier ones into the same --out)")
    parser.add_argument("--sora-lambda", type=float, default=30.0,
                        help="SoRA's L1 weight; the gates shrink by lr * lambda per step")
    parser.add_argument("--only", nargs="*", help="run only the variants whose name starts with these")
    parser.add_argument("--out", type=Path, default=Path("rank.json"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    for seed in range(args.first_seed, args.seeds):
        for variant in variants(args.steps, args.sora_lambda):
            if any(r["variant"] == variant.name and r.get("seed", 0) == seed for r in rows):
                continue
            if args.only and not any(variant.name.startswith(o) for o in args.only):
                continue
            row = run_one(variant, seed, args)
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
