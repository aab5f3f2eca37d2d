"""``lorakit federate``: a whole federated fine-tune, from settings to a logged table of rounds and a saved adapter.

The run folder holds ``run.json`` (the settings), ``metrics.jsonl`` (the starting evaluation, then one record per
round: global metrics, clients kept and excluded with reasons, bytes up and down per client, aggregation error,
privacy spent), the server checkpoint of the last round (``federation.safetensors`` / ``.json``, from which
``--resume`` continues) and the final global adapter in PEFT's format.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from ..inject import delete_adapter
from ..io.adapter_files import save_adapter
from ..io.export import attach_factors
from ..io.files import read_json, write_json
from ..train.checkpoint import METRICS_FILE, MetricsLog
from ..train.errors import TrainingError
from ..train.evaluate import describe
from ..train.warm_start import save_trained
from .apps import client_app, server_app
from .client import prepare_model
from .grid import InProcessGrid, server_identity
from .server import SERVER_FILE, STATE_FILE, FederatedServer, RoundReport
from .setup import ADAPTER, FederationConfig, federation

RUN_FILE = "run.json"
OUTPUTS = (RUN_FILE, METRICS_FILE, STATE_FILE, SERVER_FILE, "adapter_config.json", "adapter_model.safetensors",
           "lorakit_manifest.json", "README.md")
RESUMABLE = ("rounds", "engine", "client_timeout")  # may change between a run and its --resume


def _settings(config: FederationConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["options"].pop("resume"), out["options"].pop("overwrite")
    return json_safe(out)


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _prepare_output(output: Path, config: FederationConfig) -> bool:
    """Check ``output`` may hold this run; True when resuming one."""
    opts, settings = config.options, _settings(config)
    if opts.resume and opts.overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pick one")
    if opts.resume:
        if not (output / SERVER_FILE).is_file():
            raise TrainingError(f"--resume: {output} holds no federation checkpoint ({SERVER_FILE})")
        previous = read_json(output / RUN_FILE)
        changed = sorted(k for k in set(settings) | set(previous)
                         if k not in RESUMABLE and settings.get(k) != previous.get(k))
        if changed:
            raise TrainingError(f"--resume: settings differ from the run in {output}: {', '.join(changed)}")
        return True
    if output.is_dir() and any(output.iterdir()):
        if not opts.overwrite:
            raise TrainingError(f"--output {output} is not empty; pass --overwrite to replace the run there, "
                                "or --resume to continue it")
        for name in OUTPUTS:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / RUN_FILE, settings)
    return False


def _line(report: RoundReport, metrics: dict[str, Any], rounds: int) -> str:
    up = sum(report.up_bytes.values()) / max(1, len(report.up_bytes))
    text = (f"round {report.round}/{rounds}: {describe(metrics)} | {len(report.kept)}/{len(report.sampled)} clients "
            f"kept, up {up / 1024:.1f} KiB/client, down {report.down_bytes / 1024:.1f} KiB/client "
            f"({report.down_changed_bytes / 1024:.1f} KiB changed), "
            f"aggregation error {report.aggregation_error:.2g}")
    if report.epsilon:
        text += f", epsilon {report.epsilon:.2f}"
    if report.client_epsilon:
        text += f", client-level epsilon {report.client_epsilon:.2f}"
    if not report.applied:
        text += " | too few valid clients: global adapter unchanged"
    return text + "".join(f"\n  excluded client {e.client}: {e.reason}" for e in report.excluded)


def federate(config: FederationConfig) -> dict[str, Any]:
    """Run the federation; returns ``{"before", "rounds": [records], "after", "output", "seconds"}``."""
    started = time.perf_counter()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # lorakit prints one line per round and every exclusion
    output = Path(config.options.output or Path("runs") / time.strftime("federate-%Y%m%d-%H%M%S"))
    resuming = _prepare_output(output, config)
    log = MetricsLog(output / METRICS_FILE)
    result: dict[str, Any] = {"before": None, "rounds": [], "output": output}

    def on_round(report: RoundReport | None, metrics: dict[str, Any]) -> None:
        if report is None:
            result["before"] = metrics
            if not resuming:
                log.write({"kind": "eval", "when": "before", **metrics})
                print(f"before: {describe(metrics)}")
            return
        record = {"kind": "round", **report.record(), **{f"eval_{k}": v for k, v in metrics.items()}}
        log.write(record)
        result["rounds"].append(record)
        result["after"] = metrics
        print(_line(report, metrics, config.rounds))

    def prepare(server: FederatedServer) -> None:
        if resuming:
            server.load(output)
            print(f"resuming after round {server.round} of {config.rounds}")

    _run_engine(config, server_app(config, output, on_round, prepare))
    result["saved"] = _save_global(config, output)
    result["seconds"] = time.perf_counter() - started
    print(f"{result['saved']} saved to {output} ({result['seconds']:.0f} s)")
    return result


def _run_engine(config: FederationConfig, app: Any) -> None:
    clients = client_app(config)
    if config.engine == "inprocess":
        with server_identity():
            app(InProcessGrid(clients, config.clients),
                Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        return
    from flwr.simulation import run_simulation

    cpus = max(1, min(config.clients, os.cpu_count() or 1))
    run_simulation(app, clients, num_supernodes=config.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})


def _save_global(config: FederationConfig, output: Path) -> str:
    """Save the global adapter (FLoRA: its merged updates, as one LoRA on the original base)."""
    if not (output / SERVER_FILE).is_file():
        raise TrainingError(f"the federation in {output} finished no round (see the log above)")
    fed = federation(config)
    server = FederatedServer(fed)
    server.load(output)
    if config.rule.fresh:
        delete_adapter(fed.model, ADAPTER)
        attach_factors(fed.model, ADAPTER, server.merged)
        save_adapter(fed.model, output, ADAPTER)
        return "merged global update (a LoRA of the stacked client ranks)"
    prepare_model(fed, server.payload(), {}, None, None)
    return "global " + save_trained(fed.model, output, ADAPTER)
