"""The accuracy matrix of a task sequence and the usual summaries (Chaudhry et al., 2018; Lopez-Paz & Ranzato, 2017).

``rows[j][i]`` is the accuracy on task ``i`` after stage ``j`` (training task ``j``, or an unlearning request
appended after the last task). With ``T`` learned tasks:

    average accuracy  A_T = (1/T) sum_i R[T-1][i]
    forgetting        F_T = (1/(T-1)) sum_{i<T-1} ( max_{i<=j<T-1} R[j][i] - R[T-1][i] )
    backward transfer BWT = (1/(T-1)) sum_{i<T-1} ( R[T-1][i] - R[i][i] )
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AccuracyMatrix:
    """Accuracy on every task after every stage, with the base model's accuracies as ``before``."""

    tasks: list[str]
    before: list[float] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)

    def add(self, stage: str, accuracies: list[float]) -> None:
        if len(accuracies) != len(self.tasks):
            raise ValueError(f"stage {stage!r}: {len(accuracies)} accuracies for {len(self.tasks)} tasks")
        self.stages.append(stage)
        self.rows.append(list(accuracies))

    @property
    def learned(self) -> list[list[float]]:
        """The rows of the learning stages (one per task, in order), without unlearning stages."""
        return self.rows[:len(self.tasks)]

    def average_accuracy(self) -> float:
        last = self.learned[-1]
        return sum(last) / len(last)

    def forgetting(self) -> float:
        rows = self.learned
        t = len(rows)
        if t < 2:
            return 0.0
        drops = [max(rows[j][i] for j in range(i, t - 1)) - rows[t - 1][i] for i in range(t - 1)]
        return sum(drops) / len(drops)

    def backward_transfer(self) -> float:
        rows = self.learned
        t = len(rows)
        if t < 2:
            return 0.0
        return sum(rows[t - 1][i] - rows[i][i] for i in range(t - 1)) / (t - 1)

    def summary(self) -> dict[str, float]:
        return {"average_accuracy": self.average_accuracy(), "forgetting": self.forgetting(),
                "backward_transfer": self.backward_transfer()}

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "before": self.before, "stages": self.stages, "rows": self.rows,
                **self.summary()}

    def table(self) -> str:
        """The matrix as aligned text: a row per stage, a column per task."""
        width = max(12, *(len(t) + 2 for t in self.tasks))
        head = "stage".ljust(24) + "".join(t.rjust(width) for t in self.tasks)
        lines = [head, "base".ljust(24) + "".join(f"{a:.1%}".rjust(width) for a in self.before)]
        lines += [s.ljust(24) + "".join(f"{a:.1%}".rjust(width) for a in row) for s, row in zip(self.stages,
                                                                                                 self.rows)]
        s = self.summary()
        lines.append(f"average accuracy {s['average_accuracy']:.1%}  forgetting {s['forgetting']:.1%}  "
                     f"backward transfer {s['backward_transfer']:+.1%}")
        return "\n".join(lines)
