"""Does each initialisation converge faster or end better than plain LoRA on the embedded default task?

Every variant fine-tunes SmolLM2-135M-Instruct on the embedded tweet-sentiment task with the same steps, batch
size, targets (all linear layers) and schedule through ``lorakit finetune``'s own code path (``finetune``), so
data-driven initialisers see the task's loss on the first training batches (``--init-batches``). Per variant a
small learning-rate grid is run on seed 0; the best rate (lowest mean training loss over the last ``--tail``
steps) is then run on the other seeds. Reported per variant at its chosen rate, as mean ± spread over seeds:
training loss over the first ``--tail`` steps (early convergence) and the last ``--tail`` steps, held-out
accuracy and loss after training, and the trainable parameter count.

LoRA-SB trains only an r x r matrix per layer (LoRA-XS parametrisation), so at the same r it has far fewer
parameters; it runs at ``--sb-rank`` (the paper uses larger r for the same reason) and its parameter count is
printed beside it.

    python benchmarks/convergence.py [--steps 40] [--seeds 3] [--out convergence.json] [--lr PiSSA=5e-4 ...]

Results are appended to ``--out`` as each run ends (a rerun skips the runs already there), and the table is
printed from that file, so an interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorakit.io.files import read_json
from lorakit.train.checkpoint import METRICS_FILE, MetricsLog
from lorakit.train.run import Options, finetune


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    init: str | None
    lrs: tuple[float, ...]
    rank: int = 8


VARIANTS = [
    Variant("LoRA", "lora", None, (5e-4, 2e-3)),
    Variant("PiSSA", "lora", "pissa", (5e-4, 2e-3)),
    Variant("OLoRA", "lora", "olora", (5e-4, 2e-3)),
    Variant("LoRA-GA", "lora", "lora-ga", (5e-4, 2e-3)),
    Variant("EVA", "lora", "eva", (5e-4, 2e-3)),
    Variant("LoRA-SB", "lora-xs", "lora-sb", (2e-3, 1e-2)),
]


def run_one(variant: Variant, lr: float, seed: int, args: argparse.Namespace) -> dict:
    rank = args.sb_rank if variant.init == "lora-sb" else variant.rank
    with tempfile.TemporaryDirectory() as tmp:
        opts = Options(method=variant.method, init=variant.init, rank=rank, alpha=2.0 * rank, lr=lr, seed=seed,
                       steps=args.steps, batch_size=args.batch_size, eval_size=args.eval_size,
                       init_batches=args.init_batches, output=str(Path(tmp) / "run"))
        result = finetune(opts)
        steps = [r for r in MetricsLog(Path(opts.output) / METRICS_FILE).read() if r["kind"] == "step"]
        saved = read_json(Path(opts.output) / "adapter_config.json")
    losses = [r["loss"] for r in steps]
    return {"variant": variant.name, "lr": lr, "seed": seed, "rank": rank, "losses": losses,
            "accuracy": result["after"]["accuracy"], "eval_loss": result["after"]["loss"],
            "before_accuracy": result["before"]["accuracy"], "seconds": result["seconds"],
            "saved_rank": saved.get("r"), "params": args.params.get(variant.name)}


def load(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []


def done(results: list[dict], variant: Variant, lr: float, seed: int) -> bool:
    return any(r["variant"] == variant.name and r["lr"] == lr and r["seed"] == seed for r in results)


def tail_mean(losses: list[float], tail: int) -> float:
    return statistics.fmean(losses[-tail:])


def best_lr(results: list[dict], variant: Variant, tail: int) -> float | None:
    tried = [r for r in results if r["variant"] == variant.name and r["seed"] == 0]
    if len(tried) < len(variant.lrs):
        return None
    return min(tried, key=lambda r: tail_mean(r["losses"], tail))["lr"]


def spread(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def trainable_counts(sb_rank: int) -> dict[str, int]:
    """Trainable parameters per variant on SmolLM2 (all linear layers), counted on the real model."""
    import lorakit
    from lorakit.train.model import load_model

    model, _ = load_model(None)
    counts = {}
    for variant in VARIANTS:
        rank = sb_rank if variant.init == "lora-sb" else variant.rank
        name = "count_" + variant.name.replace("-", "_")
        # data-free placeholder init: the count does not depend on the initialiser
        lorakit.adapt(model, lorakit.build_config(variant.method, r=rank, targets="all-linear"), name,
                      activate=False)
        counts[variant.name] = sum(p.numel() for p in lorakit.trainable_parameters(model, name).values())
        lorakit.delete_adapter(model, name)
    return counts


def table(results: list[dict], tail: int, variants: list[Variant] = VARIANTS) -> str:
    lines = ["| variant | lr | seeds | params | loss, first %d steps | loss, last %d steps | held-out acc | "
             "held-out loss |" % (tail, tail), "|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        lr = best_lr(results, variant, tail)
        if lr is None:
            continue
        runs = [r for r in results if r["variant"] == variant.name and r["lr"] == lr]
        lines.append(
            f"| {variant.name} | {lr:g} | {len(runs)} | {runs[0]['params']:,} "
            f"| {spread([statistics.fmean(r['losses'][:tail]) for r in runs], '.4f')} "
            f"| {spread([tail_mean(r['losses'], tail) for r in runs], '.4f')} "
            f"| {spread([100 * r['accuracy'] for r in runs], '.1f')}% "
            f"| {spread([r['eval_loss'] for r in runs], '.4f')} |")
    if results:
        lines.append(f"\nbase model before training: {100 * results[0]['before_accuracy']:.1f}% held-out accuracy")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--init-batches", type=int, default=4)
    parser.add_argument("--sb-rank", type=int, default=32)
    parser.add_argument("--tail", type=int, default=10)
    parser.add_argument("--variants", help="comma-separated subset of " + ",".join(v.name for v in VARIANTS))
    parser.add_argument("--lr", action="append", default=[], metavar="VARIANT=RATE",
                        help="run VARIANT at RATE only, no grid (e.g. the rate a shorter run's grid chose); repeatable")
    parser.add_argument("--out", type=Path, default=Path("convergence.json"))
    args = parser.parse_args()
    fixed = {name: float(rate) for name, _, rate in (spec.partition("=") for spec in args.lr)}
    chosen = [dataclasses.replace(v, lrs=(fixed[v.name],)) if v.name in fixed else v for v in VARIANTS
              if args.variants is None or v.name in args.variants.split(",")]
    args.params = trainable_counts(args.sb_rank)
    # the grid on seed 0 for every variant first, then the other seeds at each variant's best rate
    plan = [(v, lr, 0) for v in chosen for lr in v.lrs] + [(v, None, s) for s in range(1, args.seeds) for v in chosen]
    for variant, lr, seed in plan:
        lr = lr if lr is not None else best_lr(load(args.out), variant, args.tail)
        if done(load(args.out), variant, lr, seed):
            continue
        record = run_one(variant, lr, seed, args)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{variant.name} lr={lr:g} seed={seed}: last-{args.tail} loss "
              f"{tail_mean(record['losses'], args.tail):.4f}, acc {record['accuracy']:.3f}", flush=True)
    print(table(load(args.out), args.tail, chosen))


if __name__ == "__main__":
    main()
