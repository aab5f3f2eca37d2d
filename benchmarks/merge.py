"""Merging 8 LoRA adapters of SmolLM2-135M (r=8, all linear layers): lorakit's rules vs PEFT's
``add_weighted_adapter``, side by side in one process; then extraction time and error against the rank.

For each rule: wall time of the merge, the peak extra resident memory while it runs (sampled every 2 ms), and the
exactness error ``||delta_merged - sum_i w_i delta_i||_F / ||sum_i w_i delta_i||_F`` over all layers together (for the
rules meant to equal the weighted sum: ``cat``, ``linear``; for the others it says how far the rule moved from it).
PEFT's ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` combine the A's and the B's separately; their ``_svd``
variants (and ``svd``) work on the deltas and re-factor to ``svd_rank`` (here 64, lorakit's rank too).

    python benchmarks/merge.py
"""
from __future__ import annotations

import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from torch import nn

import lorakit
from lorakit.hosts.host import hosts
from lorakit.merging.extract import extract_lora
from lorakit.merging.model import merge_adapters

N, RANK, TRUNCATE = 8, 8, 64
WEIGHTS = [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]
RULES = [("cat", "cat", {}), ("linear", "linear", {}), ("svd", "svd", {"rank": TRUNCATE}),
         ("ties", "ties", {"density": 0.2}), ("ties", "ties_svd", {"density": 0.2, "rank": TRUNCATE}),
         ("dare_linear", "dare_linear", {"density": 0.5}),
         ("dare_linear", "dare_linear_svd", {"density": 0.5, "rank": TRUNCATE}),
         ("magnitude_prune", "magnitude_prune_svd", {"density": 0.2, "rank": TRUNCATE})]


def smollm2() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from lorakit.train.default import default_model_dir

    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


def make_adapters(root: Path) -> list[str]:
    model, folders = smollm2(), []
    for i in range(N):
        torch.manual_seed(100 + i)
        lorakit.adapt(model, lorakit.LoraConfig(r=RANK, alpha=16, targets="all-linear", init="random"), "x")
        with torch.no_grad():
            for p in lorakit.trainable_parameters(model, "x").values():
                p.mul_(0.1)
        folders.append(str(lorakit.save_adapter(model, root / f"a{i}", "x")))
        lorakit.delete_adapter(model, "x")
    return folders


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra resident MiB) of ``fn()``."""
    process, peak, stop = psutil.Process(), [0], threading.Event()
    start_rss = process.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss - start_rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    return result, seconds, peak[0] / 2**20


def error(merged: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float:
    num = sum(float(torch.linalg.matrix_norm(merged[k] - target[k]) ** 2) for k in target)
    den = sum(float(torch.linalg.matrix_norm(target[k]) ** 2) for k in target)
    return (num / den) ** 0.5


def bench_merges(folders: list[str]) -> None:
    from peft import PeftModel

    ours = smollm2()
    names = [f"a{i}" for i in range(N)]
    for name, folder in zip(names, folders):
        lorakit.load_adapter(ours, folder, name, activate=False)
    target = {h.path: sum(w * h.adapters[n].delta_weight(h.backend) for n, w in zip(names, WEIGHTS))
              for h in hosts(ours)}
    theirs = PeftModel.from_pretrained(smollm2(), folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        theirs.load_adapter(folder, adapter_name=name)
    layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and names[0] in m.lora_A}

    def their_deltas(name: str) -> dict[str, torch.Tensor]:
        return {n.removeprefix("base_model.model."): m.get_delta_weight(name).detach() for n, m in layers.items()}

    print(f"{N} adapters of rank {RANK} on {len(target)} layers, weights {WEIGHTS}")
    print(f"{'lorakit rule':<16}{'s':>7}{'MiB':>7}{'error':>10}   {'PEFT combination':<20}{'s':>7}{'MiB':>7}"
          f"{'error':>10}")
    for i, (rule, peft_rule, options) in enumerate(RULES):
        into = f"m{i}"
        opts = {k: v for k, v in options.items() if k != "rank"}
        _, seconds, mib = measured(partial(merge_adapters, ours, names, WEIGHTS, rule=rule, into=into,
                                           rank=options.get("rank"), **opts))
        ours_err = error({h.path: h.adapters[into].delta_weight(h.backend) for h in hosts(ours)}, target)
        peft_options = {"density": options["density"]} if "density" in options else {}
        if "rank" in options:
            peft_options["svd_rank"] = options["rank"]
        _, their_s, their_mib = measured(partial(theirs.add_weighted_adapter, names, WEIGHTS, into,
                                                 combination_type=peft_rule, **peft_options))
        their_err = error(their_deltas(into), target)
        label = rule + (f" r={options['rank']}" if "rank" in options else "")
        print(f"{label:<16}{seconds:>7.2f}{mib:>7.0f}{ours_err:>10.2e}   {peft_rule:<20}{their_s:>7.2f}"
              f"{their_mib:>7.0f}{their_err:>10.2e}")


def bench_extraction() -> None:
    tuned = smollm2()
    torch.manual_seed(0)
    with torch.no_grad():  # a full fine-tune's difference: low rank 32 plus a little full-rank noise
        for module in tuned.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[0] != 49152:
                out, inp = module.weight.shape
                module.weight += 0.02 * torch.randn(out, 32) @ torch.randn(32, inp) / inp**0.5
                module.weight += 1e-4 * torch.randn(out, inp)
    print("\nextraction from a fine-tuned SmolLM2 (difference: rank 32 + small noise), all 210 linear layers")
    print(f"{'rank':>6}{'s':>8}{'largest layer error':>22}")
    for rank in (8, 16, 32, 64):
        report, seconds, _ = measured(partial(extract_lora, tuned, smollm2(), rank=rank))
        print(f"{rank:>6}{seconds:>8.2f}{max(report.errors.values()):>22.2e}")


def main() -> None:
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        bench_merges(make_adapters(Path(tmp)))
    bench_extraction()


if __name__ == "__main__":
    main()
