"""Memory-efficient training on SmolLM2-135M: peak memory, step time and optimizer-state bytes per method.

Every method runs in its own process (so each peak is its own): load the embedded SmolLM2-135M-Instruct, build the
method, run ``--steps`` train steps on random tokens (batch ``--batch`` x ``--seq``), and report

- peak memory: CUDA's allocator peak, or on CPU the peak resident set size (VmHWM, reset after loading the model
  through /proc/self/clear_refs) — weights, gradients, optimizer state and activations together;
- step time: the mean of the steps after the first (the first fits every GaLore projector; staggered refreshes
  afterwards are inside the mean), and the first step on its own;
- optimizer-state bytes, counted from the optimizer's tensors, and for GaLore/Fira the theory
  ``sum over projected (m, n): (2 r max(m, n) + r min(m, n)) * bytes`` + ``2 * numel * bytes`` for the rest.

Ratios are to LoRA (r=16 on all linear layers) and to full fine-tuning with AdamW.

    python benchmarks/memory.py [--dtype fp32|bf16] [--batch 8] [--seq 128] [--steps 6] [--rank 128]
                                [--methods lora,full-adamw,galore,...] [--threads 0]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.hooks import HookList
from lorakit.optim import build_optimizer
from lorakit.optim.lisa import LISA
from lorakit.train.model import load_model

METHODS = ("lora", "full-adamw", "galore", "galore-per-layer", "fira", "lisa", "qlora-torchao",
           "qlora-bitsandbytes", "lq-lora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _adapter(model: nn.Module, quant: str | None = None) -> dict[str, nn.Parameter]:
    config = lorakit.LoraConfig(r=16, alpha=32)
    if quant == "lq-lora":  # NF3 base + LoRA from the decomposition (1 iteration: training cost does not depend on it)
        from lorakit.quant.lq_lora import lq_lora

        lq_lora(model, config, iters=1)
        return lorakit.trainable_parameters(model)
    if quant is not None:
        lorakit.quantize(model, scheme="nf4", backend=quant)
    lorakit.adapt(model, config, dtype=torch.float32)
    return lorakit.trainable_parameters(model)


def build(method: str, model: nn.Module, rank: int) -> tuple[torch.optim.Optimizer, HookList]:
    """The optimizer (and LISA's hook) of ``method`` over ``model``."""
    full = dict(model.named_parameters())
    galore = {"rank": rank, "update_gap": 200, "scale": 0.25}
    hooks = HookList()
    if method == "lora":
        opt = build_optimizer("adamw", _adapter(model), lr=1e-4)
    elif method.startswith("qlora-"):
        opt = build_optimizer("adamw", _adapter(model, method.removeprefix("qlora-")), lr=1e-4)
    elif method == "lq-lora":
        opt = build_optimizer("adamw", _adapter(model, "lq-lora"), lr=1e-4)
    elif method == "full-adamw":
        opt = build_optimizer("adamw", full, lr=1e-5)
    elif method in ("galore", "galore-per-layer", "fira"):
        opt = build_optimizer("fira" if method == "fira" else "galore", full, lr=1e-5,
                              per_layer=method == "galore-per-layer", **galore)
    elif method == "lisa":
        opt = build_optimizer("adamw", full, lr=1e-5)
        hooks = HookList([LISA(gamma=2, interval=20)])
    else:
        raise SystemExit(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    return opt, hooks


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.ndim > 0)


def galore_theory(opt: torch.optim.Optimizer) -> int:
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            size = p.element_size()
            r = group.get("rank")
            if r is None:
                total += 2 * p.numel() * size
            else:
                m, n = p.shape
                total += (2 * r * max(m, n) + r * min(m, n)) * size
    return total


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _ = load_model(None, DTYPES[args.dtype])
    model.to(device).train()
    opt, hooks = build(method, model, args.rank)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(device)
    hooks.on_train_begin(model, opt)
    _peak_reset(device)
    times = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        hooks.before_forward(model, step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks.after_step(model, opt, step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    result = {"method": method, "peak": _peak_bytes(device), "first": times[0], "mean": sum(times[1:]) / len(times[1:]),
              "state": state_bytes(opt), "trainable": sum(p.numel() for g in opt.param_groups for p in g["params"]
                                                          if p.requires_grad)}
    if method in ("galore", "galore-per-layer", "fira"):
        result["theory"] = galore_theory(opt)
    return result


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by = {r["method"]: r for r in rows}
    print(f"SmolLM2-135M-Instruct {args.dtype}, batch {args.batch}x{args.seq}, device={args.device}, "
          f"threads={args.threads or torch.get_num_threads()}, {args.steps} steps (mean over steps 2..{args.steps}), "
          f"GaLore/Fira rank {args.rank}, T=200")
    head = (f"{'method':<20}{'peak MB':>9}{'xLoRA':>7}{'xFull':>7}{'step s':>8}{'xLoRA':>7}{'xFull':>7}"
            f"{'1st s':>7}{'opt state MB':>13}{'xFull':>7}  theory")
    print(head)

    def ratio(row: dict[str, Any], base: str, key: str) -> str:
        ref = by.get(base)
        return f"{row[key] / ref[key]:>7.2f}" if ref and ref[key] else f"{'-':>7}"

    for r in rows:
        theory = ("" if "theory" not in r else
                  f"{r['theory'] / 2**20:.1f} MB ({'exact' if r['theory'] == r['state'] else 'DIFFERS'})")
        print(f"{r['method']:<20}{r['peak'] / 2**20:>9.0f}{ratio(r, 'lora', 'peak')}{ratio(r, 'full-adamw', 'peak')}"
              f"{r['mean']:>8.2f}{ratio(r, 'lora', 'mean')}{ratio(r, 'full-adamw', 'mean')}{r['first']:>7.2f}"
              f"{r['state'] / 2**20:>13.1f}{ratio(r, 'full-adamw', 'state')}  {theory}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is reported apart)")
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    rows = []
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("dtype", "batch", "seq", "steps", "rank", "device", "threads")]
    for method in args.methods.split(","):
        done = subprocess.run([sys.executable, __file__, *forwarded, "--one", method], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{method}: not measured ({last})", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"measured {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    _table(rows, args)


if __name__ == "__main__":
    main()
