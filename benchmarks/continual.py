"""Continual learning and unlearning on the embedded tasks: the accuracy matrix of every method, side by side.

SmolLM2-135M-Instruct learns three embedded tasks in sequence -- tweet sentiment, Shakespeare genre (held-out plays),
chatterbot dialogue topic -- with each learner of ``lorakit.continual.LEARNERS`` (LoRA r=8 on q/v, ``--steps`` steps
of ``--batch-size`` per task). Printed per learner: the accuracy matrix, average accuracy, forgetting, the first
task's held-out loss after each stage (the "alignment set" AlignGuard protects) and the time. Then the joint model
(every task learned with replay, merged) receives an unlearning request for ``--forget`` from each unlearner:
accuracy on the forgotten task (chance is 1/labels) and the share of the others' accuracy kept.

    python benchmarks/continual.py                        # ~60-90 minutes on 2 CPU cores
    python benchmarks/continual.py --methods sequential,lae --unlearn ""     # a subset
    python benchmarks/continual.py --methods codyra --unlearn "" --option codyra:sparsity=0.6
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lorakit.continual import LEARNERS, UNLEARNERS, AdapterSettings, FitSettings, load_tasks, run_sequence
from lorakit.continual.gs_lora import FFN_TARGETS
from lorakit.continual.loop import accuracy, cross_entropy
from lorakit.train.model import load_model

UNLEARN_VARIANTS = {"o3": {}, "o3-ungated": {"gate": False}, "gs-lora": {}}


def learner_row(name: str, args: argparse.Namespace, tasks: list, adapter: AdapterSettings,
                settings: FitSettings) -> tuple[dict, torch.nn.Module, object]:
    torch.manual_seed(args.seed)
    model, tok = load_model(None)
    first, _, first_held = tasks[0].encoded(tok, args.max_length)
    first_loss = []

    def measure(model: torch.nn.Module, stage: str) -> None:
        with torch.no_grad():
            losses = [float(cross_entropy(first)(model, first.collate(first_held[i:i + 30])))
                      for i in range(0, len(first_held), 30)]
        first_loss.append(sum(losses) / len(losses))

    learner = LEARNERS.get(name)(adapter, settings, **args.options.get(name, {}))
    started = time.perf_counter()
    model, matrix = run_sequence(model, tok, tasks, learner, max_length=args.max_length, after_stage=measure)
    row = {"kind": "learn", "method": name, **matrix.to_dict(), "first_task_loss": first_loss,
           "seconds": time.perf_counter() - started}
    if name == "codyra":
        row["ranks_kept"] = [sum(r.values()) for r in learner.ranks]
        row["layers_kept"] = [len(r) for r in learner.ranks]
    return row, model, learner


def unlearn_rows(model: torch.nn.Module, learner: object, args: argparse.Namespace, tasks: list,
                 adapter: AdapterSettings, settings: FitSettings) -> list[dict]:
    _, tok = load_model(None)
    encoded = [t.encoded(tok, args.max_length) for t in tasks]
    merged = learner.finish(model)
    index = [t.name for t in tasks].index(args.forget)
    before = [accuracy(merged, s, held) for s, _, held in encoded]
    rows = []
    for variant in [v for v in args.unlearn.split(",") if v]:
        base = variant.split("-ungated")[0]
        kind = adapter if base == "o3" else AdapterSettings(adapter.rank, adapter.alpha, FFN_TARGETS)
        unlearner = UNLEARNERS.get(base)(kind, settings, **UNLEARN_VARIANTS[variant], **args.options.get(base, {}))
        work = copy.deepcopy(merged)
        retained = [(s, tr) for i, (s, tr, _) in enumerate(encoded) if i != index]
        started = time.perf_counter()
        unlearner.forget(work, encoded[index][0], encoded[index][1], retained)
        after = [accuracy(work, s, held, unlearner.predict) for s, _, held in encoded]
        kept = [after[i] / before[i] for i in range(len(tasks)) if i != index]
        rows.append({"kind": "unlearn", "method": variant, "forget": args.forget, "before": before, "after": after,
                     "chance": 1 / len(tasks[index].labels), "kept_share": kept,
                     "seconds": time.perf_counter() - started})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="sequential,lae,codyra,alignguard,joint")
    parser.add_argument("--unlearn", default="o3,o3-ungated,gs-lora", help="unlearners run on the joint model")
    parser.add_argument("--forget", default="dialogue")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=240)
    parser.add_argument("--eval-size", type=int, default=90)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="continual-benchmark.jsonl")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="an option of one method, e.g. codyra:sparsity=0.6 (value read as JSON)")
    args = parser.parse_args()
    args.options = {}
    for text in args.option:
        method, _, pair = text.partition(":")
        key, _, value = pair.partition("=")
        if not (method and key and value):
            parser.error(f"--option {text!r}: write METHOD:KEY=VALUE")
        args.options.setdefault(method, {})[key] = json.loads(value)
    tasks = load_tasks(["tweets", "shakespeare", "dialogue"], args.train_size, args.eval_size, args.seed)
    adapter = AdapterSettings(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    settings = FitSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = Path(args.output)
    methods = [m for m in args.methods.split(",") if m]
    if args.unlearn and "joint" not in methods:
        methods.append("joint")
    for name in methods:
        row, model, learner = learner_row(name, args, tasks, adapter, settings)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        if name == "joint" and args.unlearn:
            for unlearn in unlearn_rows(model, learner, args, tasks, adapter, settings):
                with out.open("a") as f:
                    f.write(json.dumps(unlearn) + "\n")
    print(table(out))


def table(path: Path) -> str:
    """Markdown tables of the rows in ``path`` (the last row of each method wins)."""
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[(row["kind"], row["method"])] = row
    names = None
    lines = []
    for (kind, method), row in rows.items():
        if kind != "learn":
            continue
        names = row["tasks"]
        diag = " / ".join(f"{row['rows'][i][i]:.1%}" for i in range(len(names)))
        last = " / ".join(f"{a:.1%}" for a in row["rows"][-1])
        loss = " -> ".join(f"{x:.3f}" for x in row["first_task_loss"])
        lines.append(f"| {method} | {diag} | {last} | {row['average_accuracy']:.1%} | {row['forgetting']:.1%} | "
                     f"{loss} | {row['seconds'] / 60:.1f} |")
    head = [f"| learner | just learned ({' / '.join(names or [])}) | after the last task | average | forgetting | "
            "first task's loss per stage | min |", "|---|---|---|---:|---:|---|---:|"]
    unlearn = ["", "| unlearner | forgotten task: before -> after (chance) | others kept | min |", "|---|---|---|---:|"]
    for (kind, method), row in rows.items():
        if kind == "unlearn":
            index = names.index(row["forget"]) if names else 0
            unlearn.append(f"| {method} | {row['before'][index]:.1%} -> {row['after'][index]:.1%} "
                           f"({row['chance']:.0%}) | {' / '.join(f'{k:.0%}' for k in row['kept_share'])} | "
                           f"{row['seconds'] / 60:.1f} |")
    return "\n".join(head + lines + unlearn)


if __name__ == "__main__":
    main()
