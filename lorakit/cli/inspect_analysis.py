"""``lorakit inspect --spectrum``: the spectra, intruder dimensions and subspace similarity of a trained update.

    lorakit inspect --model BASE --spectrum runs/a                          # per layer: effective rank, ||delta||
    lorakit inspect --model BASE --spectrum runs/a --compare runs/b --k 8   # + Grassmann similarity with b
    lorakit inspect --spectrum runs/full --base BASE --intruders --plot spectra.png   # a fully fine-tuned model

Each layer's update is the adapter's ``s B A`` (or a method's dense ``delta_weight``), or ``W_tuned - W_base`` of a
fully fine-tuned model. The table gives its effective rank (Roy & Vetterli 2007: ``exp`` of the entropy of
``s / sum(s)``), its Frobenius norm, the intruder dimensions of ``W0 + delta`` among its top-``k`` left singular
vectors (Shuttleworth et al. 2024: ``max |cos| < epsilon`` against every singular vector of ``W0``) and the mean
squared cosine of the principal angles between the top-``k`` left singular subspaces of the two updates (Hu et al.
2021, Sec. 7.2).
"""
from __future__ import annotations

import argparse
import math

import torch

from ..analysis.intruders import ModelIntruders, model_intruders
from ..analysis.plots import plot_intruders, plot_spectra
from ..analysis.spectrum import layer_updates, spectra, subspace_similarity, weight_differences
from ..errors import LorakitError, require
from ..io.adapter_files import load_adapter
from ..train.model import load_model

ANALYSED, COMPARED = "analysed", "compared"


def add_analysis_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("analysis")
    group.add_argument("--spectrum", metavar="DIR", help="analyse this PEFT adapter folder on --model; with --base: "
                                                         "this fully fine-tuned model folder against its base")
    group.add_argument("--base", metavar="MODEL", help="the model the --spectrum model was fully fine-tuned from")
    group.add_argument("--compare", metavar="ADAPTER_DIR", help="with --spectrum: the subspace similarity of each "
                                                                "layer's update with this adapter's (on the base)")
    group.add_argument("--intruders", action="store_true", help="with --spectrum: count each layer's intruder "
                                                                "dimensions")
    group.add_argument("--k", type=int, default=10, help="top singular vectors tested for intruders and compared "
                                                         "(default 10)")
    group.add_argument("--epsilon", type=float, default=0.5, help="a top vector is an intruder when its largest "
                                                                  "|cosine| with the base's is below this (0.5)")
    group.add_argument("--plot", metavar="PNG", help="draw the spectra to PNG (and, with --intruders, the counts to "
                                                     "<PNG stem>-intruders.png)")


def _check(args: argparse.Namespace) -> None:
    if args.spectrum is None:
        raise LorakitError("--compare, --intruders, --base and --plot analyse the update given by --spectrum DIR; "
                           "give --spectrum")
    if args.base is not None and args.model is not None:
        raise LorakitError("with --base, --spectrum names the fully fine-tuned model and --base its base; --model "
                           "(the base of an adapter) does not apply: drop it or drop --base")
    require(args.k >= 1, "--k", args.k, "must be >= 1")
    require(0.0 < args.epsilon <= 1.0, "--epsilon", args.epsilon, "must be in (0, 1]")


def _cell(value: float | int | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def run_analysis(args: argparse.Namespace) -> int:
    """Print the per-layer table (and draw ``--plot``); 0 on success."""
    _check(args)
    if args.base is not None:
        tuned, _ = load_model(args.spectrum, torch.float32)
        model, _ = load_model(args.base, torch.float32)  # the model --compare's adapter goes on
        updates = weight_differences(tuned, model)
        if not updates:
            raise LorakitError(f"{args.spectrum} has the same linear weights as {args.base}: nothing to analyse")
        intruders: ModelIntruders | None = (model_intruders(tuned, base_model=model, k=args.k, epsilon=args.epsilon)
                                            if args.intruders else None)
    else:
        model, _ = load_model(args.model, torch.float32)
        load_adapter(model, args.spectrum, ANALYSED, activate=False, dtype=torch.float32)
        updates = layer_updates(model, ANALYSED)
        intruders = model_intruders(model, ANALYSED, k=args.k, epsilon=args.epsilon) if args.intruders else None
    similarity: dict[str, float] | None = None
    if args.compare is not None:
        load_adapter(model, args.compare, COMPARED, activate=False, dtype=torch.float32)
        theirs = layer_updates(model, COMPARED)
        similarity = {p: subspace_similarity(u, theirs[p], args.k) for p, u in updates.items() if p in theirs}
    report = spectra(updates)
    width = max(len(layer.path) for layer in report)
    print(f"{'layer':<{width}}  {'eff. rank':>9}  {'||delta||_F':>11}  {'intruders':>9}  {'similarity':>10}")
    for layer in report:
        count = None if intruders is None else intruders.counts.get(layer.path)
        shared = None if similarity is None else similarity.get(layer.path)
        print(f"{layer.path:<{width}}  {layer.effective_rank:>9.2f}  {layer.frobenius_norm:>11.4g}  "
              f"{_cell(count, 'd'):>9}  {_cell(shared, '.3f'):>10}")
    summary = [f"{len(report)} layers"]
    if intruders is not None:
        summary.append(f"{intruders.total} intruder dimensions (top {args.k}, epsilon {args.epsilon})")
    if similarity:
        finite = [v for v in similarity.values() if not math.isnan(v)]
        summary.append(f"mean similarity {sum(finite) / len(finite):.3f} over {len(finite)} shared layers"
                       if finite else "no shared layer with a non-zero update to compare")
    print("; ".join(summary))
    if args.plot is not None:
        png = plot_spectra(report, args.plot)
        print(f"spectra drawn to {png}")
        if intruders is not None:
            bars = plot_intruders(intruders.counts, png.with_name(f"{png.stem}-intruders{png.suffix}"))
            print(f"intruder counts drawn to {bars}")
    return 0
