"""Fine-tuning adapters: data, tasks, the training loop, checkpoints, evaluation and data parallelism.

    from lorakit.train import Options, finetune
    finetune(Options(data="train.jsonl", task="sft", steps=200, output="runs/sft"))
"""
from .errors import DataError, TrainingError
from .loop import StepResult, TrainConfig, Trainer
from .run import Options, evaluate_adapter, finetune

__all__ = ["DataError", "Options", "StepResult", "TrainConfig", "Trainer", "TrainingError", "evaluate_adapter",
           "finetune"]
