"""Three task adapters on the embedded tweet task, each alone vs combined by a trained X-LoRA head.

The embedded default's training tweets (its held-out 200 stay held out) are cut into three random thirds; a LoRA
(r=16, all linear layers) is fine-tuned on each third (``--steps`` steps), then an X-LoRA head is trained over the
three frozen adapters on the whole training split (``lorakit finetune --method xlora``). Every row of the table is
the accuracy on the same 200 held-out tweets (SmolLM2-135M-Instruct, label-token logits).

    python benchmarks/mixture_tweets.py            # ~6 minutes on 2 CPU cores
    python benchmarks/mixture_tweets.py --steps 10
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from lorakit.train import default
from lorakit.train.data import split
from lorakit.train.run import Options, evaluate_adapter, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--head-steps", type=int, default=15)
    args = parser.parse_args()
    records = default.default_records()
    train, _ = split(records, min(200, len(records) // 10))  # the embedded default's own split
    random.Random(0).shuffle(train)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root, experts = Path(tmp), {}
        for i in range(3):
            shard = root / f"shard{i}.jsonl"
            shard.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                     for r in train[i::3]))
            started = time.perf_counter()
            finetune(Options(data=str(shard), task="classification", prompt_template=default.PROMPT_TEMPLATE,
                             steps=args.steps, output=str(root / f"t{i}"), seed=i))
            result = evaluate_adapter(Options(), str(root / f"t{i}"))
            rows.append((f"adapter t{i} alone (a third of the data)", result["after"]["accuracy"],
                         time.perf_counter() - started))
            experts[f"t{i}"] = str(root / f"t{i}")
        started = time.perf_counter()
        mixed = finetune(Options(method="xlora", experts=experts, steps=args.head_steps,
                                 output=str(root / "xlora"), lr=5e-3, method_options={"layerwise": True}))
        rows.insert(0, ("base model", mixed["before"]["accuracy"], 0.0))
        rows.append(("X-LoRA head over t0, t1, t2 (trained on all)", mixed["after"]["accuracy"],
                     time.perf_counter() - started))
    print(f"\n{'':<48}{'held-out accuracy':>18}{'seconds':>9}")
    for label, accuracy, seconds in rows:
        print(f"{label:<48}{accuracy:>18.1%}{seconds:>9.0f}")


if __name__ == "__main__":
    main()
