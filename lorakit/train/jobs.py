"""``lorakit finetune --jobs jobs.json``: several fine-tuning jobs trained together over one base model.

A jobs file is a JSON list of objects, one per job, with a ``name`` (the adapter's name, a Python identifier) and
any of ``lorakit finetune``'s options under their Python names (``batch_size``, ``grad_accum``, ...; dashes are
accepted too), for example::

    [{"name": "a", "data": "a.jsonl", "rank": 8, "lr": 1e-3, "steps": 20},
     {"name": "b", "data": "b.jsonl", "task": "classification", "method": "dora", "steps": 40, "seed": 1}]

Options given on the command line are every job's defaults. All jobs share one base model, so ``model``,
``device``, ``bf16``, ``quant`` and ``quant_backend`` must agree; a job's ``output`` defaults to
``<--output>/<name>``; relative paths are relative to the working directory, as on the command line. Each job's
folder ends up as a solo run's would (``run.json``, ``metrics.jsonl``, before/after evaluation, the adapter in
PEFT's format, ``loss.png``), and its adapter equals what ``lorakit finetune`` with the same options trains (see
:mod:`lorakit.train.multijob`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import AdapterConfig
from ..errors import LorakitError
from ..hooks import training_hooks
from ..inject import disable, set_active
from ..quant.model import quantize
from .checkpoint import METRICS_FILE, MetricsLog, prepare_output, start_run
from .errors import DataError, TrainingError
from .evaluate import evaluate
from .mixture import MIXTURES
from .model import load_model_on
from .multijob import Job, JobCallback, MultiJobTrainer, add_job_adapter
from .plot import plot_loss
from .run import (
    Options,
    Prepared,
    adapter_config,
    default_output,
    option_hooks,
    prepare_data,
    quantize_first,
    records_of,
    report_lines,
    train_config,
)
from .warm_start import initialize_from_task, needs_data, save_trained

SHARED = ("model", "device", "bf16", "quant", "quant_backend")  # one base model for every job
DEFAULTS = Options()
UNSUPPORTED = {"resume": "resuming", "save_every": "checkpoints during training"}
KEYS = ("name", *(f.name for f in dataclasses.fields(Options) if f.name not in UNSUPPORTED))


@dataclass(frozen=True)
class JobSpec:
    """One validated entry of a jobs file."""

    name: str
    options: Options
    adapter: AdapterConfig

    @property
    def output(self) -> Path:
        return Path(self.options.output)  # always set by read_jobs


def _adapter_config(where: str, opts: Options) -> AdapterConfig:
    """The job's adapter config, after checking the settings that can be judged before any data is read."""
    if opts.quant is not None and not quantize_first(opts):
        raise DataError(f"{where}: init {opts.init!r} must see the full-precision base before it is quantised, so "
                        f"it cannot share a quantised base with other jobs; run this job on its own")
    if opts.method in MIXTURES:
        raise DataError(f"{where}: a mixture ({opts.method}) trains on its own; run it without --jobs")
    try:
        train_config(opts, 1)
        return adapter_config(opts)
    except (ValueError, LorakitError) as exc:  # a method config's rule or an unknown method
        raise DataError(f"{where}: {exc}") from None


def _job(path: Path, index: int, entry: Any, defaults: Options, root: Path) -> JobSpec:
    where = f"jobs file {path}, job {index}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: must be a JSON object, found {type(entry).__name__}")
    entry = {key.replace("-", "_"): value for key, value in entry.items()}
    name = entry.pop("name", None)
    if not (isinstance(name, str) and name.isidentifier()):
        raise DataError(f"{where}: 'name' must be given as a Python identifier (it names the adapter), got {name!r}")
    where = f"jobs file {path}, job {index} ({name!r})"
    for key in entry:
        if key in UNSUPPORTED:
            raise DataError(f"{where}: {key!r} is not supported with --jobs ({UNSUPPORTED[key]} of several jobs "
                            f"is not implemented); run that job on its own")
        if key not in KEYS:
            raise DataError(f"{where}: unknown key {key!r}; keys: {', '.join(KEYS)}")
    output = entry.get("output") or str(root / name)
    try:
        opts = dataclasses.replace(defaults, **{**entry, "output": output})
    except LorakitError as exc:
        raise DataError(f"{where}: {exc}") from None
    return JobSpec(name, opts, _adapter_config(where, opts))


def read_jobs(path: str | Path, defaults: Options = DEFAULTS) -> list[JobSpec]:
    """The validated jobs of the file at ``path``; ``defaults`` (the command line's options) fill in missing keys."""
    path = Path(path)
    for option, what in UNSUPPORTED.items():
        if getattr(defaults, option) != getattr(DEFAULTS, option):
            raise DataError(f"--{option.replace('_', '-')}: {what} is not supported with --jobs")
    if not path.is_file():
        raise DataError(f"jobs file {path} does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"jobs file {path} is not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"jobs file {path} must hold a non-empty JSON list of job objects")
    root = Path(defaults.output) if defaults.output else default_output()
    specs = [_job(path, i, entry, defaults, root) for i, entry in enumerate(entries)]
    for what, values in (("name", [s.name for s in specs]),
                         ("output", [str(s.output.resolve()) for s in specs])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise DataError(f"jobs file {path}: every job needs its own {what}; repeated: {repeated}")
    for key in SHARED:
        values = {getattr(s.options, key) for s in specs}
        if len(values) > 1:
            raise DataError(f"jobs file {path}: all jobs share one base model, so {key!r} must be the same for all; "
                            f"got {sorted(map(str, values))}")
    return specs


def _settings(spec: JobSpec, path: Path) -> dict[str, Any]:
    return {**dataclasses.asdict(spec.options), "world_size": 1, "job": spec.name, "jobs_file": str(path)}


def finetune_jobs(path: str | Path, defaults: Options = DEFAULTS,
                  callbacks: Sequence[JobCallback] = ()) -> dict[str, dict[str, Any]]:
    """Run every job of the jobs file at ``path`` in one pass; returns ``{name: {"before", "after", "output"}}``."""
    started = time.perf_counter()
    specs = read_jobs(path, defaults)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError("--jobs trains in one process; start it without torchrun")
    for spec in specs:
        prepare_output(spec.output, _settings(spec, Path(path)), resume=False, overwrite=spec.options.overwrite)
    records = [records_of(spec.options) for spec in specs]  # bad data fails before the model loads
    first = specs[0].options
    model, tokenizer = load_model_on(first.model, first.device, first.bf16)
    if first.quant is not None:
        quantize(model, first.quant, first.quant_backend)
    jobs: list[Job] = []
    prepared: dict[str, Prepared] = {}
    for spec, rows in zip(specs, records):
        prepared[spec.name] = job = Prepared(model, *prepare_data(spec.options, tokenizer, rows))
        _add_adapter(spec, job)
        start_run(spec.output, _settings(spec, Path(path)), fresh=True)
        config = train_config(spec.options, len(job.train))
        hooks = [*training_hooks(spec.adapter, spec.name, config.steps),
                 *option_hooks(spec.options)]
        jobs.append(Job(spec.name, job.task, job.train, config, spec.output, hooks))
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        with disable(model):
            results[spec.name] = {"before": _evaluate(spec, prepared[spec.name], "before"), "output": spec.output}
    MultiJobTrainer(model, jobs, callbacks).train()
    for spec, job in zip(specs, jobs):
        set_active(model, spec.name)
        after = results[spec.name]["after"] = _evaluate(spec, prepared[spec.name], "after")
        saved = save_trained(model, spec.output, spec.name)
        plot_loss(MetricsLog(spec.output / METRICS_FILE).read(), spec.output / "loss.png")
        lines = report_lines(results[spec.name]["before"], after, prepared[spec.name])
        print(f"job {spec.name} ({job.config.steps} steps of {job.config.global_batch} examples): {saved} saved to "
              f"{spec.output}\n  " + "\n  ".join(lines))
    print(f"wall time {time.perf_counter() - started:.0f} s for {len(jobs)} jobs trained together")
    return results


def _add_adapter(spec: JobSpec, prepared: Prepared) -> None:
    """Add the job's adapter as its solo run would, running a data-driven initialiser on the job's own data."""
    model, opts = prepared.model, spec.options

    def initialize() -> None:
        if needs_data(model, spec.name):
            initialize_from_task(model, prepared.task, prepared.train, opts.batch_size, opts.init_batches, opts.seed,
                                 spec.name)

    add_job_adapter(model, spec.adapter, spec.name, opts.seed, initialize)


def _evaluate(spec: JobSpec, prepared: Prepared, when: str) -> dict[str, float]:
    metrics = evaluate(prepared.model, prepared.task, prepared.held_out, spec.options.eval_batch_size,
                       desc=f"eval {spec.name} {when}")
    MetricsLog(spec.output / METRICS_FILE).write({"kind": "eval", "when": when, **metrics})
    return metrics

