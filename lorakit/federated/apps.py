"""lorakit's Flower apps: a ``ClientApp`` that trains a client's adapter, and a ``ServerApp`` whose strategy (a
Flower ``FedAvg`` with the aggregation replaced by a lorakit aggregator) runs the rounds, evaluates the global
adapter after each one, logs it and checkpoints it.

Messages carry adapter tensors as ``ArrayRecord``s keyed ``"<layer path>|<role>"`` (:mod:`.layers`); FLoRA's merged
update travels as roles ``merged_up`` / ``merged_down`` of the same layers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from ..errors import LorakitError
from .client import ClientResult, local_train
from .layers import Layers, flatten, unflatten
from .server import MERGED_DOWN, MERGED_UP, FederatedServer, RoundReport
from .setup import FederationConfig, federation

log = logging.getLogger(__name__)
RoundCallback = Callable[[RoundReport, dict], None]  # after each round: its report and the global metrics


def encode(payload: Layers, merged: dict[str, tuple[Tensor, Tensor]]) -> ArrayRecord:
    layers = {path: dict(roles) for path, roles in payload.items()}
    for path, (up, down) in merged.items():
        layers.setdefault(path, {}).update({MERGED_UP: up, MERGED_DOWN: down})
    return ArrayRecord({k: v.contiguous() for k, v in flatten(layers).items()})


def decode(arrays: ArrayRecord) -> tuple[Layers, dict[str, tuple[Tensor, Tensor]]]:
    layers = unflatten(arrays.to_torch_state_dict())
    merged = {p: (r.pop(MERGED_UP), r.pop(MERGED_DOWN)) for p, r in layers.items() if MERGED_UP in r}
    return {p: r for p, r in layers.items() if r}, merged


def _drill(kind: str | None, upload: Layers) -> Layers:
    """A client misbehaving on purpose (``inject_faults``): how fault handling is exercised end to end."""
    if kind == "drop":
        raise ConnectionError("client dropped out mid-round (injected fault)")
    first = next(iter(upload))
    role = next(iter(upload[first]))
    if kind == "nan":
        upload[first][role] = torch.full_like(upload[first][role], float("nan"))
    elif kind == "shape":
        upload[first][role] = upload[first][role][:-1]
    elif kind == "huge":
        upload = {p: {r: t * 1000.0 for r, t in roles.items()} for p, roles in upload.items()}
    return upload


def client_app(config: FederationConfig) -> ClientApp:
    """The ClientApp: node ``partition-id`` is client ``k`` of ``config``."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:  # noqa: ANN001 - flwr's Context
        client = int(context.node_config["partition-id"])
        payload, merged = decode(message.content["arrays"])
        result = local_train(federation(config), client, int(message.content["config"]["round"]), payload, merged)
        upload = _drill(config.inject_faults.get(client), result.upload)
        metrics = MetricRecord({"num-examples": result.examples, "client": client, **result.metrics})
        return Message(RecordDict({"arrays": encode(upload, {}), "metrics": metrics}), reply_to=message)

    return app


class LoraStrategy(FedAvg):
    """Flower's FedAvg sampling and messaging, with lorakit's aggregation, evaluation and checkpoints."""

    def __init__(self, server: FederatedServer, output: Path, on_round: RoundCallback) -> None:
        config = server.config
        super().__init__(fraction_train=config.fraction, fraction_evaluate=0.0, min_train_nodes=1,
                         min_available_nodes=config.clients)
        self.server, self.output, self.on_round = server, output, on_round
        self.offset = server.round  # rounds done before a resume
        self.sent: list[int] = []
        self.node_client: dict[int, int] = {}
        self.report: RoundReport | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["round"] = self.offset + server_round
        messages = list(super().configure_train(server_round, encode(self.server.payload(), self.server.merged),
                                                config, grid))
        self.sent = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        results: dict[int, ClientResult] = {}
        failures: dict[int, str] = {}
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                failures[self.node_client.get(node, -1)] = f"node {node} failed: {reply.error.reason[:300]}"
                continue
            try:
                client = int(reply.content["metrics"]["client"])
                payload, _ = decode(reply.content["arrays"])
                results[client] = ClientResult(payload, int(reply.content["metrics"]["num-examples"]))
                self.node_client[node] = client
            except (KeyError, ValueError, TypeError, LorakitError) as exc:
                failures[self.node_client.get(node, -1)] = f"node {node} sent an unreadable reply: {exc}"
        for node in self.sent:
            if node not in answered:
                failures[self.node_client.get(node, -1)] = f"node {node} sent no reply within the timeout"
        sampled = sorted(self.node_client.get(n, -1) for n in self.sent)
        self.report = self.server.aggregate(self.offset + server_round, sampled, results, failures)
        return encode(self.server.payload(), {}), MetricRecord({"kept": len(self.report.kept)})

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralised evaluation of the global adapter; after a round, its log line and checkpoint."""
        metrics = self.server.evaluate()
        if server_round > 0 and self.report is not None:
            self.server.save(self.output)
            self.on_round(self.report, metrics)
        elif server_round == 0:
            self.on_round(None, metrics)  # the starting point
        return MetricRecord({k: float(v) for k, v in metrics.items()})


def run_server(grid: Grid, server: FederatedServer, output: Path, on_round: RoundCallback) -> None:
    """The rounds left to run (all of them, or those after a resumed checkpoint)."""
    config = server.config
    strategy = LoraStrategy(server, output, on_round)
    left = config.rounds - server.round
    if left > 0:
        strategy.start(grid, ArrayRecord(), num_rounds=left, timeout=config.client_timeout,
                       evaluate_fn=strategy.evaluate)


def server_app(config: FederationConfig, output: Path, on_round: RoundCallback,
               prepare: Callable[[FederatedServer], None] = lambda s: None) -> ServerApp:
    """The ServerApp (``prepare`` may restore a checkpoint before the rounds start)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:  # noqa: ANN001 - flwr's Context
        server = FederatedServer(federation(config))
        prepare(server)
        run_server(grid, server, output, on_round)

    return app
