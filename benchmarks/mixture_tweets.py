"""Three task adapters on the embedded tweet task: each alone, merged (``linear`` average, ``ties``, ``lego``), and
combined by a trained X-LoRA head.

The embedded default's training tweets (its held-out 200 stay held out) are cut into three random thirds; a LoRA
(r=16, all linear layers) is fine-tuned on each third (``--steps`` steps); the three are merged with weights 1/3 by
each rule (``lorakit.merging``), and an X-LoRA head is trained over them, frozen, on the whole training split
(``lorakit finetune --method xlora``). Every row is the accuracy on the same 200 held-out tweets (SmolLM2-135M-Instruct,
label-token logits). ``--workdir`` keeps the adapters, so a second run only evaluates.

    python benchmarks/mixture_tweets.py --steps 45 --head-steps 30     # ~15 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from lorakit.io.adapter_files import load_adapter, save_adapter
from lorakit.merging.model import merge_adapters
from lorakit.train import default
from lorakit.train.data import split
from lorakit.train.model import load_model
from lorakit.train.run import Options, evaluate_adapter, finetune


def merge_three(experts: dict[str, str], rule: str, options: dict, output: Path) -> Path:
    """The three adapters merged with weights 1/3 by ``rule``, saved to ``output``."""
    model, _ = load_model(None, torch.float32)
    for name, folder in experts.items():
        load_adapter(model, folder, name, activate=False)
    merge_adapters(model, list(experts), [1 / 3] * 3, rule=rule, into="merged", **options)
    return save_adapter(model, output, "merged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--head-steps", type=int, default=15)
    parser.add_argument("--workdir", help="keep (and reuse) the adapters here")
    args = parser.parse_args()
    records = default.default_records()
    train, _ = split(records, min(200, len(records) // 10))  # the embedded default's own split
    random.Random(0).shuffle(train)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root, experts = Path(args.workdir or tmp), {}
        for i in range(3):
            shard, started = root / f"shard{i}.jsonl", time.perf_counter()
            if not (root / f"t{i}" / "adapter_model.safetensors").is_file():
                root.mkdir(parents=True, exist_ok=True)
                shard.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                         for r in train[i::3]))
                finetune(Options(data=str(shard), task="classification", prompt_template=default.PROMPT_TEMPLATE,
                                 steps=args.steps, output=str(root / f"t{i}"), seed=i, overwrite=True))
            result = evaluate_adapter(Options(), str(root / f"t{i}"))
            rows.append((f"adapter t{i} alone (a third of the data)", result["after"]["accuracy"],
                         time.perf_counter() - started))
            experts[f"t{i}"] = str(root / f"t{i}")
        for rule, options in (("linear", {}), ("ties", {"density": 0.5}), ("lego", {})):
            started = time.perf_counter()
            merged = merge_three(experts, rule, options, root / f"merged_{rule}")
            result = evaluate_adapter(Options(), str(merged))
            rows.append((f"t0, t1, t2 merged by {rule} (weights 1/3)", result["after"]["accuracy"],
                         time.perf_counter() - started))
        started = time.perf_counter()
        mixed = finetune(Options(method="xlora", experts=experts, steps=args.head_steps, overwrite=True,
                                 output=str(root / "xlora"), lr=5e-3, method_options={"layerwise": True}))
        rows.insert(0, ("base model", mixed["before"]["accuracy"], 0.0))
        rows.append(("X-LoRA head over t0, t1, t2 (trained on all)", mixed["after"]["accuracy"],
                     time.perf_counter() - started))
    print(f"\n{'':<50}{'held-out accuracy':>18}{'seconds':>9}")
    for label, accuracy, seconds in rows:
        print(f"{label:<50}{accuracy:>18.1%}{seconds:>9.0f}")


if __name__ == "__main__":
    main()
