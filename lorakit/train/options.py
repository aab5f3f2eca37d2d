"""The options of ``lorakit finetune`` / ``lorakit eval`` / a jobs file entry, validated once.

:class:`Options` checks every field when it is made, whoever makes it: the command line (``lorakit.cli``), a jobs
file (:mod:`lorakit.train.jobs`, which names the job in the message) or Python code. What needs the data or the
model (the targets, an adapter config's own rules) is checked when the run is prepared.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from ..config import ALL_LINEAR
from ..hosts.codecs import CODECS
from ..init import INITS
from ..methods.base import METHODS
from ..optim import OPTIMIZERS
from ..quant.model import DEFAULT_BACKEND
from .device import check_device_spec
from .errors import DataError
from .mixture import MIXTURES, check_mixture_options
from .tasks import TASKS
from .trained import FULL

DEFAULT_STEPS = 45  # the embedded default: 80% held-out accuracy in ~90 s on 2 CPU cores (docs/benchmarks.md)


@dataclass(frozen=True)
class Options:
    """Everything ``lorakit finetune`` / ``lorakit eval`` accept (``None``: the embedded default or a derived value)."""

    model: str | None = None
    data: str | None = None
    task: str | None = None  # default: classification for the embedded data, causal-lm otherwise
    text_column: str | None = None  # default: "text" ("prompt" for sft)
    label_column: str = "label"
    response_column: str = "response"
    prompt_template: str | None = None
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    targets: str = ALL_LINEAR
    init: str | None = None  # the method's initialiser (default: the method's own)
    init_batches: int = 8  # training batches a data-driven initialiser sees
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # other config fields of the method
    experts: dict[str, Any] = dataclasses.field(default_factory=dict)  # --method xlora: name -> adapter folder
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:<i> | mps (lorakit.train.device)
    bf16: bool | None = None  # the base model in bfloat16; None: on a GPU with fast bf16, float32 elsewhere
    fsdp: bool = False  # shard the frozen base over the processes (FSDP2, lorakit.train.fsdp)
    quant: str | None = None  # quantise the base's linear layers (lorakit.quantize scheme), e.g. "nf4"
    quant_backend: str = DEFAULT_BACKEND
    seed: int = 0
    max_length: int = 128
    eval_size: int | None = None  # default: min(200, a tenth of the examples)
    eval_batch_size: int = 32
    output: str | None = None
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    optimizer: str = "adamw"  # a name in lorakit.optim.OPTIMIZERS
    optimizer_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the optimizer's own options
    lisa: bool = False  # LISA: train lisa_layers sampled blocks (plus everything outside the blocks) at a time
    lisa_layers: int = 2  # LISA's gamma
    lisa_interval: int = 20  # LISA's K: steps between draws

    def __post_init__(self) -> None:
        """One validation for the command line, the jobs file and the Python API: types, then each rule."""
        hints = typing.get_type_hints(Options)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _type_ok(value, hints[field.name]):
                raise DataError(f"{field.name!r} must be {_type_name(hints[field.name])}, got {value!r}")
        if self.steps is not None and self.epochs is not None:
            raise DataError("give --steps or --epochs, not both")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "init_batches", "max_length", "lisa_layers",
                     "lisa_interval", "steps", "eval_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DataError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "epochs"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise DataError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.save_every < 0:
            raise DataError(f"--save-every must be >= 0, got {self.save_every}")
        check_device_spec(self.device)
        if self.task is not None and self.task not in TASKS:
            raise DataError(f"--task {self.task!r} is unknown; tasks: {', '.join(TASKS)}")
        for name, known in (("method", [*METHODS.names(), FULL, *MIXTURES]), ("optimizer", OPTIMIZERS.names()),
                            ("quant_backend", CODECS.names()), ("init", [*INITS.names(), None])):
            if getattr(self, name) not in known:
                raise DataError(f"{_flag(name)} {getattr(self, name)!r} is unknown; choose one of: "
                                f"{', '.join(str(k) for k in known if k is not None)}")
        if self.method == FULL:
            given = [f for f, v in (("--init", self.init), ("--quant", self.quant),
                                    ("--method-option", self.method_options or None)) if v is not None]
            if given:
                raise DataError(f"--method full trains every weight of the model, so {', '.join(given)} cannot "
                                f"apply (they configure an adapter or a frozen quantised base)")

        sharded_quant = self.quant is None or CODECS.get(self.quant_backend).shardable
        if self.fsdp and (self.method in (FULL, *MIXTURES) or not sharded_quant):
            given = (f"--method {self.method}" if self.method in (FULL, *MIXTURES) else
                     f"--quant {self.quant} --quant-backend {self.quant_backend}")
            shardable = [n for n in CODECS.names() if CODECS.get(n).shardable]
            raise DataError(f"--fsdp shards a frozen base (full precision, or quantised by a backend whose tensors "
                            f"FSDP2 can shard: {', '.join(shardable)}) under a trained adapter; {given} is not "
                            f"supported with it (use data parallelism: torchrun without --fsdp)")
        if self.method in MIXTURES:
            check_mixture_options(self.method, self.method_options, self.experts)
        elif self.experts:
            raise DataError("--experts names the frozen experts of --method xlora")

    @property
    def task_name(self) -> str:
        return self.task or ("classification" if self.data is None else "causal-lm")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the field type ``hint`` (no bool for int, an int for a float)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(hint) is not None:  # dict[str, Any]: a JSON object
        return isinstance(value, typing.get_origin(hint))
    return type(value) is (type(None) if hint is None else hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    names = {type(None): "null", dict: "a JSON object"}
    origin = typing.get_origin(hint) or hint
    return names.get(origin, getattr(origin, "__name__", str(origin)))
