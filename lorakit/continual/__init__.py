"""Continual learning and unlearning with adapters: LAE, CoDyRA, AlignGuard-LoRA (learners), O3 and GS-LoRA
(unlearners), a task-sequence runner and its accuracy matrix (``lorakit continual``)."""
from . import alignguard, codyra, gs_lora, lae, o3  # noqa: F401  (register the methods)
from .learners import LEARNERS, AdapterSettings, Learner
from .loop import FitSettings, accuracy, fit
from .matrix import AccuracyMatrix
from .runner import run_sequence
from .tasks import EMBEDDED, ContinualTask, load_tasks
from .unlearn import UNLEARNERS, Unlearner

__all__ = ["LEARNERS", "UNLEARNERS", "AccuracyMatrix", "AdapterSettings", "ContinualTask", "EMBEDDED",
           "FitSettings", "Learner", "Unlearner", "accuracy", "fit", "load_tasks", "run_sequence"]
