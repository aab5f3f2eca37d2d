"""The loss-curve PNG. matplotlib is optional: without it the plot is skipped with a note."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_loss(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """Plot training loss per step (and held-out loss before / after) to ``path``; ``False`` if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r for r in records if r["kind"] == "step"]
    evals = {r["when"]: r for r in records if r["kind"] == "eval"}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", linewidth=1)
    last = steps[-1]["step"] if steps else 1
    for when, x, marker in (("before", 0, "o"), ("after", last, "s")):
        if when in evals:
            ax.plot([x], [evals[when]["loss"]], marker, label=f"held-out loss {when}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
