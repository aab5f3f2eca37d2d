"""Fine-tuning adapters: data, tasks, the training loop, checkpoints, evaluation and data parallelism.

    from lorakit.train import Options, finetune
    finetune(Options(data="train.jsonl", task="sft", steps=200, output="runs/sft"))
"""
from .errors import DataError, TrainingError
from .jobs import finetune_jobs
from .loop import StepResult, TrainConfig, Trainer
from .multijob import Job, MultiJobTrainer, add_job_adapter
from .options import Options
from .run import evaluate_adapter, finetune

__all__ = ["DataError", "Job", "MultiJobTrainer", "Options", "StepResult", "TrainConfig", "Trainer", "TrainingError",
           "add_job_adapter", "evaluate_adapter", "finetune", "finetune_jobs"]
