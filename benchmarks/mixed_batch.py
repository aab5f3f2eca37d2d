"""A batch mixing N distinct adapters: lorakit (AdapterPool + route) vs PEFT's ``adapter_names``, x the base step.

Batch 64, row i uses adapter i % N; a decode step (T=1: one token per row, no KV cache) and a prefill (T=32).
The pool's adapters live in per-layer slot stacks; lorakit picks the padded grid (two ``bmm`` over the slots) or one
product pair per slot by tokens per adapter (``lorakit.routing.stacked``); the ``per-slot`` and ``grid`` columns force
one kernel, to show where the crossover is. ``MB read`` is the weights a step must read at
least once: the base model's plus the N distinct adapters' (the memory-bound floor is their ratio to the base).

    python benchmarks/mixed_batch.py                      # tiny Llama, fp32, rank-16 LoRA on all linear layers
    python benchmarks/mixed_batch.py --ranks 4,8,16,64    # heterogeneous ranks (padded to r_max)
    python benchmarks/mixed_batch.py --smollm2            # SmolLM2-135M, bf16, r=8 on q,v
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import torch
from common import interleaved_medians, tiny_llama
from torch import nn

import lorakit
from lorakit.routing import stacked


def param_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_adapters(make_model: Callable[[], nn.Module], n: int, ranks: list[int], targets: list[str] | str,
                  root: Path) -> list[Path]:
    """Save ``n`` random LoRA adapters (rank ``ranks[i % len(ranks)]``) of ``make_model()`` under ``root``."""
    model, paths = make_model(), []
    for i in range(n):
        r = ranks[i % len(ranks)]
        torch.manual_seed(100 + i)
        lorakit.adapt(model, lorakit.LoraConfig(r=r, alpha=2.0 * r, targets=targets, init="random"), "x")
        with torch.no_grad():
            for p in lorakit.trainable_parameters(model, "x").values():
                p.mul_(0.1)
        paths.append(lorakit.save_adapter(model, root / f"a{i}", "x"))
        lorakit.delete_adapter(model, "x")
    return paths


def forced(limit: float | None, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with both limits of the stacked path's rule set to ``limit`` (``None``: lorakit's rule)."""
    def run() -> None:
        saved = stacked.GRID_RULES["cpu"]
        if limit is not None:
            stacked.GRID_RULES["cpu"] = stacked.GridRule(limit, limit)
        try:
            step()
        finally:
            stacked.GRID_RULES["cpu"] = saved
    return run


def table(make_model: Callable[[], nn.Module], paths: list[Path], args: argparse.Namespace) -> None:
    import peft

    base = make_model()
    base_bytes = param_bytes(list(base.parameters()))
    ours_model = make_model()
    pool = lorakit.AdapterPool(ours_model, capacity=max(args.adapters))
    theirs = peft.PeftModel.from_pretrained(make_model(), paths[0], adapter_name="a0").eval()
    for i, path in enumerate(paths):
        pool.register(f"a{i}", path)
        if i:
            theirs.load_adapter(path, adapter_name=f"a{i}")
    adapter_bytes = [pool.info(f"a{i}")["bytes"] for i in range(len(paths))]
    print(f"threads={torch.get_num_threads()} batch={args.batch} base weights {base_bytes / 2**20:.1f} MB "
          f"reps={args.reps} (median ms; x base)")
    print(f"{'T':>3}{'N':>4}{'base ms':>9}{'peft':>8}{'lorakit':>9}{'kernel':>9}{'per-slot':>9}{'grid':>9}"
          f"{'MB read':>9}{'floor':>7}")
    for tokens in args.tokens:
        ids = torch.randint(0, base.config.vocab_size, (args.batch, tokens), generator=torch.Generator().manual_seed(0))
        for n in args.adapters:
            names = [f"a{i % n}" for i in range(args.batch)]
            pool.acquire(names)

            def ours(ids: torch.Tensor = ids, names: list[str] = names) -> None:
                with lorakit.route(ours_model, names):
                    ours_model(ids, use_cache=False)

            steps = {
                "base": lambda ids=ids: base(ids, use_cache=False),
                "peft": lambda ids=ids, names=names: theirs(ids, adapter_names=names, use_cache=False),
                "lorakit": forced(None, ours),
                "per-slot": forced(0, ours),
                "grid": forced(float("inf"), ours),
            }
            with torch.inference_mode():
                med = interleaved_medians(steps, args.reps, args.warmup, torch.device("cpu"))
            pool.release(names)
            kernel = "grid" if args.batch // n * tokens <= stacked.GRID_RULES["cpu"].max_tokens else "per-slot"
            read = base_bytes + sum(adapter_bytes[:n])
            x = {k: v / med["base"] for k, v in med.items()}
            print(f"{tokens:>3}{n:>4}{med['base'] * 1e3:>9.1f}{x['peft']:>8.2f}{x['lorakit']:>9.2f}{kernel:>9}"
                  f"{x['per-slot']:>9.2f}{x['grid']:>9.2f}{read / 2**20:>9.1f}{read / base_bytes:>7.2f}")


def smollm2() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from lorakit.train.default import default_model_dir

    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 32])
    parser.add_argument("--adapters", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--ranks", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M bf16, r=8 on q_proj, v_proj")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smollm2:
        make_model, ranks, targets = smollm2, args.ranks or [8], ["q_proj", "v_proj"]
    else:
        make_model, ranks, targets = (lambda: tiny_llama().eval()), args.ranks or [16], "all-linear"
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(make_model, max(args.adapters), ranks, targets, Path(tmp))
        print(f"{'SmolLM2-135M bf16' if args.smollm2 else 'tiny Llama fp32'}, LoRA ranks {ranks} on {targets}")
        table(make_model, paths, args)


if __name__ == "__main__":
    main()
