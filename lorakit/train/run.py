"""``finetune`` and ``evaluate_adapter``: the whole job from options to a saved adapter and before/after metrics.

With no data given, the embedded default runs: SmolLM2-135M-Instruct classifies the sentiment of held-out tweets
(negative / neutral / positive) from the logits of the label tokens, before and after LoRA fine-tuning.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import ALL_LINEAR
from ..hooks import TrainingHook, training_hooks
from ..hosts.host import adapters_named
from ..init import INITS
from ..inject import adapt, disable
from ..io.adapter_files import adapter_tensors, load_adapter
from ..methods.base import METHODS, build_config
from ..optim.lisa import LISA
from ..quant.model import quantize
from ..targeting import find_targets
from . import default
from .checkpoint import METRICS_FILE, MetricsLog, prepare_output, start_run
from .data import Record, read_records, split
from .ddp import World, close_world, init_world
from .device import resolve_device
from .errors import DataError
from .evaluate import describe, evaluate, majority_rate
from .fsdp import shard_frozen_base
from .loop import Callback, TrainConfig, Trainer
from .mixture import MIXTURES, build_mixture, load_run_mixture, mixture_hooks
from .model import load_model_on
from .options import DEFAULT_STEPS, Options
from .plot import plot_loss
from .tasks import CausalLMTask, ClassificationTask, Example, SFTTask, Task
from .trained import FULL, save_result, trained_parameters
from .warm_start import initialize_from_task, needs_data


@dataclass
class Prepared:
    """A loaded model with its task and the fixed train / held-out split."""

    model: nn.Module
    task: Task
    train: list[Example]
    held_out: list[Example]


def parse_targets(text: str) -> str | tuple[str, ...]:
    """``all-linear``; ``q_proj,v_proj`` (module names); anything else is a regular expression over module paths."""
    if text == ALL_LINEAR or not re.fullmatch(r"[\w.,]+", text):
        return text
    return tuple(name for name in text.split(",") if name)


def adapter_config(opts: Options) -> Any:
    """The registered method's config from ``--method/--rank/--alpha/--targets``.

    A method without an ``r`` or ``alpha`` field ignores that option, with a note when it was changed.
    """
    _, config_cls = METHODS.get(opts.method)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    given = {"r": ("rank", opts.rank), "alpha": ("alpha", opts.alpha), "targets": ("targets", opts.targets)}
    if opts.init is not None and "init" not in fields:
        raise DataError(f"--init {opts.init}: method {opts.method!r} has no initialiser option")
    for field, (option, value) in given.items():
        if field not in fields and value != getattr(Options, option):
            print(f"note: method {opts.method!r} has no {field!r} field; --{option} {value} is not used")
    values = {field: value for field, (_, value) in given.items() if field in fields}
    if opts.init is not None:
        values["init"] = opts.init
    unknown = sorted(set(opts.method_options) - fields)
    if unknown:
        raise DataError(f"method {opts.method!r} has no option(s) {unknown}; its config fields: {sorted(fields)}")
    values.update(opts.method_options)
    if "targets" in values:
        values["targets"] = parse_targets(opts.targets)
    return build_config(opts.method, **values)


def records_of(opts: Options) -> list[Record]:
    """The records of ``--data`` (the embedded tweets when none is given)."""
    return default.default_records() if opts.data is None else read_records(opts.data)


def _task(opts: Options, tokenizer: Any, records: Sequence[Record]) -> Task:
    name = opts.task_name
    if name == "causal-lm":
        return CausalLMTask(tokenizer, opts.max_length, opts.text_column or "text")
    if name == "sft":
        return SFTTask(tokenizer, opts.max_length, opts.text_column or "prompt", opts.response_column)
    if name == "classification":
        template = opts.prompt_template or (default.PROMPT_TEMPLATE if opts.data is None else "Text: {text}\nLabel:")
        return ClassificationTask(tokenizer, opts.max_length, ClassificationTask.labels_of(records, opts.label_column),
                                  opts.text_column or "text", opts.label_column, template)
    raise DataError(f"--task {name!r} is unknown; tasks: causal-lm, sft, classification")


def quantize_first(opts: Options) -> bool:
    """``--quant`` applies right after loading, unless a registered initialiser must see the full-precision weight
    (LoftQ, PiSSA, LoRA-GA...): then the base it rewrote is quantised after adapting (QPiSSA, LoftQ)."""
    return opts.quant is not None and (opts.init is None or opts.init not in INITS)


def prepare(opts: Options) -> Prepared:
    """Load the model and tokenizer onto ``--device`` (before adapting: adapters are made where the weights are;
    with ``--fsdp`` into host memory, sharded onto the device later), read and tokenize the data, and split off the
    held-out examples."""
    records = records_of(opts)
    model, tokenizer = load_model_on(opts.model, opts.device, opts.bf16, place=not opts.fsdp)
    if quantize_first(opts):
        quantize(model, opts.quant, opts.quant_backend)
    return Prepared(model, *prepare_data(opts, tokenizer, records))


def prepare_data(opts: Options, tokenizer: Any, records: Sequence[Record]) -> tuple[Task, list[Example], list[Example]]:
    """``(task, train, held_out)``: ``records`` tokenized for ``opts``' task, the held-out examples split off."""
    task = _task(opts, tokenizer, records)
    examples = task.encode(records)
    eval_size = opts.eval_size if opts.eval_size is not None else max(1, min(200, len(examples) // 10))
    train, held_out = split(examples, eval_size)
    return task, train, held_out


def train_config(opts: Options, n_train: int) -> TrainConfig:
    """The optimisation settings of ``opts`` for ``n_train`` training examples (``--epochs`` turned into steps)."""
    steps = opts.steps if opts.steps is not None else DEFAULT_STEPS
    if opts.epochs is not None:
        steps = max(1, -(-int(opts.epochs * n_train) // (opts.batch_size * opts.grad_accum)))
    return TrainConfig(steps=steps, batch_size=opts.batch_size, grad_accum=opts.grad_accum, lr=opts.lr,
                       seed=opts.seed, save_every=opts.save_every, optimizer=opts.optimizer,
                       optimizer_options=dict(opts.optimizer_options))


def option_hooks(opts: Options) -> list[TrainingHook]:
    """Hooks the options ask for (``--lisa``)."""
    if not opts.lisa:
        return []
    return [LISA(gamma=opts.lisa_layers, interval=opts.lisa_interval, seed=opts.seed)]


def report_lines(before: dict[str, float], after: dict[str, float], prepared: Prepared) -> list[str]:
    """The before/after lines a run prints (with the majority-class rate for classification)."""
    lines = [f"before: {describe(before)}", f"after:  {describe(after)}"]
    if isinstance(prepared.task, ClassificationTask):
        label, rate = majority_rate(prepared.held_out)
        lines.append(f"majority-class rate: {rate:.1%} (always {prepared.task.labels[label]!r}) "
                     f"on {len(prepared.held_out)} held-out examples")
    return lines


def default_output() -> Path:
    return Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")


def finetune(opts: Options, callbacks: Sequence[Callback] = (), hooks: Sequence[TrainingHook] = ()) -> dict[str, Any]:
    """Run a fine-tune; returns ``{"before": ..., "after": ..., "output": ..., "seconds": ...}``.

    ``callbacks`` observe each finished step; ``hooks`` change ranks, layers or update rules (see ``train.hooks``).
    """
    started = time.perf_counter()
    world = init_world(resolve_device(opts.device))
    try:
        return _finetune(opts, world, started, callbacks, hooks)
    finally:
        close_world(world)


def _finetune(opts: Options, world: World, started: float, callbacks: Sequence[Callback],
              hooks: Sequence[TrainingHook]) -> dict[str, Any]:
    output = Path(opts.output) if opts.output else default_output()
    settings = {**dataclasses.asdict(opts), "output": str(output), "world_size": world.size}
    checkpoint = prepare_output(output, settings, resume=opts.resume, overwrite=opts.overwrite)
    full, mixture = opts.method == FULL, opts.method in MIXTURES
    torch.manual_seed(opts.seed)
    prepared = prepare(opts)
    config = train_config(opts, len(prepared.train))
    adapter = None if full or mixture else adapter_config(opts)
    if adapter is not None:  # a bad --targets stops here, before evaluating or writing anything
        find_targets(prepared.model, adapter)
    # measured before adapting: initialisers such as PiSSA or LoRA-GA rewrite the base weights
    before = _logged_before(output) if checkpoint is not None else None
    if before is None and not opts.fsdp:
        before = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size, world,
                          "eval before")
    if mixture:
        build_mixture(prepared.model, opts.method, opts.method_options, opts.experts, opts.rank, opts.alpha,
                      parse_targets(opts.targets))
        world.broadcast(list(trained_parameters(prepared.model).values()))
    elif adapter is None:
        prepared.model.requires_grad_(True)  # every weight trains; all processes loaded the same ones
    else:
        _adapt(prepared, adapter, opts, world)
    if opts.fsdp:  # the base model is measured sharded, with the adapter off (whole, it sits in host memory)
        world = dataclasses.replace(world, lockstep=True)
        _shard(prepared, opts, world)
        if before is None:
            with disable(prepared.model):
                before = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size, world,
                                  "eval before")
    torch.manual_seed(opts.seed + world.rank)  # random ops in training (dropout) differ per process
    if world.main:
        start_run(output, settings, fresh=checkpoint is None)
    world.barrier()
    method_hooks = mixture_hooks() if mixture else [] if adapter is None else training_hooks(adapter, "default",
                                                                                               config.steps)
    trainer = Trainer(prepared.model, prepared.task, prepared.train, config, output, world, callbacks,
                      [*method_hooks, *option_hooks(opts), *hooks])
    if checkpoint is not None:
        trainer.resume_latest()
    log = trainer.log
    if _logged_before(output) is None:
        log.write({"kind": "eval", "when": "before", **before})
    trainer.train()
    after = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size, world, "eval after")
    log.write({"kind": "eval", "when": "after", **after})
    seconds = time.perf_counter() - started
    if world.main:
        saved = save_result(prepared.model, output, prepared.task.tokenizer)
        plotted = plot_loss(log.read(), output / "loss.png")
        lines = report_lines(before, after, prepared) + [
            f"wall time {seconds:.0f} s ({config.steps} steps of {config.global_batch} examples, "
            f"{len(prepared.train)} training examples)",
            f"{saved} saved to {output}" + ("" if plotted else " (loss plot skipped: pip install matplotlib)")]
        print("\n".join(lines))
    return {"before": before, "after": after, "output": output, "seconds": seconds}


def _adapt(prepared: Prepared, adapter: Any, opts: Options, world: World) -> None:
    """Add adapter ``default`` (float32), run a data-driven initialiser, quantise the base if asked to after that."""
    adapt(prepared.model, adapter, "default", dtype=torch.float32)
    if needs_data(prepared.model):
        initialize_from_task(prepared.model, prepared.task, prepared.train, opts.batch_size, opts.init_batches,
                             opts.seed)
    if opts.quant is not None and not quantize_first(opts):
        quantize(prepared.model, opts.quant, opts.quant_backend)
    world.broadcast(list(adapter_tensors(prepared.model, "default").values()))


def _shard(prepared: Prepared, opts: Options, world: World) -> None:
    """``--fsdp``: shard the frozen base over the processes (:mod:`.fsdp`), refusing a base an initialiser
    rewrote (the base model's metrics are measured with the adapter off)."""
    if not world.distributed:
        raise DataError("--fsdp shards the base over the processes torchrun starts (torchrun --nproc-per-node N -m "
                        "lorakit finetune --fsdp ...); in one process drop --fsdp")
    if any(adapter.rewrites_base for _, adapter in adapters_named(prepared.model, "default")):
        raise DataError(f"--fsdp: --init {opts.init} rewrote the base weights, so the base model can no longer be "
                        f"measured before training; drop --fsdp or use an initialiser that keeps the base")
    held, total = shard_frozen_base(prepared.model, world, resolve_device(opts.device))
    if world.main:
        print(f"fsdp: frozen base sharded over {world.size} processes; each holds {held:,} of its {total:,} "
              f"weights")


def _logged_before(output: Path) -> dict[str, Any] | None:
    """The base model's metrics recorded by an earlier start of the run in ``output``."""
    records = MetricsLog(output / METRICS_FILE).read()
    return next(({k: v for k, v in r.items() if k not in ("kind", "when")} for r in records
                 if r["kind"] == "eval" and r["when"] == "before"), None)


def evaluate_adapter(opts: Options, adapter: str | None) -> dict[str, Any]:
    """Before/after metrics of the base model and the base model with the adapter in folder ``adapter``."""
    prepared = prepare(opts)
    before = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size, desc="eval base")
    result: dict[str, Any] = {"before": before}
    if adapter is not None:
        if not load_run_mixture(prepared.model, adapter):
            load_adapter(prepared.model, adapter, dtype=torch.float32)
        result["after"] = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size,
                                   desc="eval adapter")
        print("\n".join(report_lines(before, result["after"], prepared)))
    else:
        print(f"base: {describe(before)}")
    return result
