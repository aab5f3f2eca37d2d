"""``lorakit compress``: factor a model's linear layers into low-rank pairs (LORD, METHODS.md entry 67) and save it.

    lorakit compress --rank-ratio 0.4 --output smol-lowrank/                      # truncated SVD
    lorakit compress --energy 0.9 --method activation --calibration-batches 8 --output out/   # SVD-LLM whitening
    lorakit compress --model runs/full --rank-ratio 0.3 --method fisher --data train.jsonl --output out/

The calibration batches of ``activation`` / ``fisher`` come from the training split of the data (``--data``, else
the embedded tweets) as ``lorakit finetune`` tokenizes it. The output is a transformers folder that ``lorakit
finetune / eval / serve --model`` load.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterator

import torch

from ..compress.decompose import DECOMPOSITIONS
from ..compress.model import CompressionReport, compress_model, save_compressed
from ..errors import require
from ..train.model import load_model
from ..train.run import parse_targets, prepare_data, records_of
from .options import add_data_args, options_from


def compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="transformers model folder or .gguf file (default: the embedded "
                                        "SmolLM2-135M-Instruct)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank-ratio", type=float, help="rank k = round(R * min(d_out, d_in)) per layer, R in (0, 1]")
    size.add_argument("--energy", type=float, help="per layer, the fewest directions holding this share of the "
                                                   "(weighted) squared norm, in (0, 1]")
    parser.add_argument("--method", dest="decomposition", default="svd", choices=DECOMPOSITIONS,  # not Options.method
                        help="svd (truncated SVD), activation (whitened by calibration inputs, SVD-LLM / ASVD) or "
                             "fisher (rows weighted by squared gradients, FWSVD)")
    parser.add_argument("--calibration-batches", type=int, default=8,
                        help="training batches that activation / fisher see")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per calibration batch")
    parser.add_argument("--targets", default="all-linear",
                        help="'all-linear' (not the output head), comma-separated module names or a regex")
    parser.add_argument("--min-size", type=int, default=0, help="leave layers with fewer weights dense")
    parser.add_argument("--output", required=True, help="folder of the compressed model")
    add_data_args(parser)


def _calibration(args: argparse.Namespace, tokenizer: Any) -> tuple[Iterator[dict[str, torch.Tensor]], Any]:
    """The first ``--calibration-batches`` training batches and the task's summed loss."""
    opts = options_from(args)
    task, train, _ = prepare_data(opts, tokenizer, records_of(opts))
    size = args.batch_size
    batches = (task.collate(train[i:i + size]) for i in range(0, min(len(train), args.calibration_batches * size),
                                                               size))
    return batches, lambda model, batch: task.loss_sums(model, batch).loss


def summary(report: CompressionReport) -> list[str]:
    """One line per factored and skipped layer, then the totals."""
    width = max((len(p) for p in (*report.layers, *report.skipped)), default=4)
    lines = [f"{'layer':<{width}}  rank/full   params before -> after   rel. error"]
    for path, r in report.layers.items():
        lines.append(f"{path:<{width}}  {r.rank:>4}/{r.full_rank:<4}  {r.params_before:>12,} -> {r.params_after:<12,}"
                     f"{r.error:.3e}")
    lines += [f"{path:<{width}}  skipped: {reason}" for path, reason in report.skipped.items()]
    lines.append(f"{len(report.layers)} layers factored by {report.method!r} ({len(report.skipped)} skipped): "
                 f"{report.params_before:,} -> {report.params_after:,} parameters in them; model "
                 f"{report.model_params_before:,} -> {report.model_params_after:,} ({report.ratio:.1%})")
    return lines


def run_compress(args: argparse.Namespace) -> int:
    require(args.calibration_batches >= 1, "--calibration-batches", args.calibration_batches, "must be >= 1")
    model, tokenizer = load_model(args.model, torch.float32)
    batches, loss = _calibration(args, tokenizer) if args.decomposition != "svd" else (None, None)
    report = compress_model(model, rank_ratio=args.rank_ratio, energy=args.energy, method=args.decomposition,
                            calibration=batches, targets=parse_targets(args.targets), min_size=args.min_size,
                            loss=loss)
    save_compressed(model, tokenizer, args.output)
    print("\n".join(summary(report) + [f"saved to {args.output}"]))
    return 0
