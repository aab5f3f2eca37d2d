"""Robust alternating minimisation for matrix completion (``lorakit.analysis.altmin``, METHODS.md entry 84): cost per
iteration against the number of observed entries, and recovery.

For each ``n`` a rank-``r`` ``n x n`` matrix ``M = U V^T`` (``U``, ``V`` Gaussian, so incoherent with high
probability) is observed on each entry independently with probability ``p = 8 r log(n) / n`` (``|Omega| ~ 8 r n log
n``). One iteration (a ``U`` and a ``V`` half-step) is timed as ``(t(1 + k) - t(1)) / k`` with ``--iters`` = ``k``
and ``tol=0``, so the spectral initialisation (a dense SVD, ``O(n^3)``) cancels; the median over ``--reps`` runs of
each is taken, in CPU seconds of this process (with the default 1 thread, its compute time, which other jobs on
shared cores do not inflate as they do the wall clock). A near-linear cost in ``|Omega|`` keeps seconds /
``|Omega|`` roughly flat as ``n`` grows. The recovery error is ``||U V^T - M||_F / ||M||_F`` over all entries
after ``--recovery-iters`` iterations.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/altmin.py [--sizes 250,500,1000,2000] [--rank 5] [--iters 10]
                                                        [--recovery-iters 50] [--reps 3] [--update-noise 0]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from lorakit.analysis.altmin import complete


def problem(n: int, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(M, mask)``: a random rank-``rank`` ``(n, n)`` matrix (float64) and its observed entries (bool)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    v = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    p = min(1.0, 8 * rank * math.log(n) / n)
    return u @ v.T, torch.rand(n, n, generator=generator, dtype=torch.float64) < p


def median_cpu_seconds(run: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(n: int, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per iteration, ``|Omega|`` and the recovery error for size ``n``."""
    m, mask = problem(n, args.rank, args.seed)
    observed = m * mask

    def run(iters: int) -> tuple[Tensor, Tensor]:
        return complete(observed, mask, args.rank, iters=iters, tol=0.0, update_noise=args.update_noise,
                        seed=args.seed)

    run(1)  # warm-up
    timed = median_cpu_seconds(lambda: run(1 + args.iters), args.reps)
    per_iter = (timed - median_cpu_seconds(lambda: run(1), args.reps)) / args.iters
    u, v = run(args.recovery_iters)
    error = float(torch.linalg.norm(u.double() @ v.double().T - m) / torch.linalg.norm(m))
    return {"n": n, "omega": int(mask.sum()), "per_iter": per_iter, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,500,1000,2000", help="comma-separated n (square n x n)")
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (beyond the first)")
    parser.add_argument("--recovery-iters", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--update-noise", type=float, default=0.0, help="relative error of every half-step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2 cores are shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"rank {args.rank}, p = 8 r log(n) / n, {args.iters} timed iterations (median of {args.reps}), "
          f"update_noise {args.update_noise}, {args.threads} thread(s)\n")
    print("| n | observed share | \\|Omega\\| | CPU s / iteration | us / iteration / \\|Omega\\| | "
          f"relative error after {args.recovery_iters} iterations |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(n, args)
        print(f"| {n} | {r['omega'] / n**2:.3f} | {r['omega']} | {r['per_iter']:.4f} | "
              f"{r['per_iter'] / r['omega'] * 1e6:.3f} | {r['error']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
