"""The training hook of routers: their auxiliary losses join each forward's loss, their statistics each step's log."""
from __future__ import annotations

from torch import Tensor, nn

from ..hooks import TrainingHook, summed
from ..inject import routers


class RouterLosses(TrainingHook):
    """Adds every router's auxiliary losses (``pop_loss``: load balance, z-loss) to the loss of the forward that
    produced them, and logs each router's ``stats()`` (entropy, per-expert load) as ``router/<name>/<stat>``.

    Trainers call it like any hook (lorakit's loop and :class:`~lorakit.train.hf_trainer.LorakitTrainer` do); a
    router whose losses nobody takes keeps only those of its latest forward."""

    def __init__(self) -> None:
        self._model: nn.Module | None = None

    def forward_loss(self, model: nn.Module) -> Tensor | None:
        self._model = model
        return summed(r.pop_loss() for r in routers(model).values() if hasattr(r, "pop_loss"))

    def metrics(self) -> dict[str, float]:
        if self._model is None:
            return {}
        return {f"router/{name}/{key}": value for name, r in routers(self._model).items() if hasattr(r, "stats")
                for key, value in r.stats().items()}
