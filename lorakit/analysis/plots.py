"""Figures of the analyses: the singular values of each layer's update (with its effective rank, Roy & Vetterli
2007: ``exp(H(s / sum s))``) and the intruder dimensions per layer (Shuttleworth et al. 2024: top-``k`` singular
vectors of ``W0 + dW`` with ``max |cos| < epsilon`` against those of ``W0``). matplotlib is imported when a figure is
drawn, with the file-only Agg backend.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Mapping, Sequence

from ..errors import require
from .spectrum import LayerSpectrum


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(report: Sequence[LayerSpectrum], path: str | Path) -> Path:
    """Two panels written to ``path``: every layer's singular values by index (log scale), and each layer's effective
    rank."""
    require(len(report) > 0, "report", len(report), "needs at least one layer to plot")
    plt = _pyplot()
    fig, (values, ranks) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        for layer in report:
            s = layer.singular_values.double()
            positive = s[s > 0]
            if positive.numel():
                values.plot(range(1, positive.numel() + 1), positive.numpy(), marker=".", linewidth=1,
                            label=layer.path)
        values.set_yscale("log")
        values.set(xlabel="index", ylabel="singular value", title="spectrum of each layer's update")
        if len(report) <= 12:
            values.legend(fontsize=6)
        ranks.bar(range(len(report)), [layer.effective_rank for layer in report])
        ranks.set(xlabel="layer", ylabel="effective rank", title="effective rank (Roy & Vetterli)")
        ranks.set_xticks(range(len(report)), [layer.path for layer in report], rotation=90, fontsize=5)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def plot_intruders(counts: Mapping[str, int], path: str | Path) -> Path:
    """A bar per layer: its number of intruder dimensions, written to ``path``."""
    require(len(counts) > 0, "counts", len(counts), "needs at least one layer to plot")
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(max(6.0, 0.25 * len(counts)), 4.5))
    try:
        axis.bar(range(len(counts)), list(counts.values()), color="tab:red")
        axis.set(xlabel="layer", ylabel="intruder dimensions",
                 title=f"intruder dimensions per layer (total {sum(counts.values())})")
        axis.set_xticks(range(len(counts)), list(counts), rotation=90, fontsize=5)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)
