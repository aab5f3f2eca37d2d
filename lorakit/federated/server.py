"""The server's side of a federation: the global adapter, one aggregation round at a time, centralised evaluation,
communication and privacy accounting, and a checkpoint after every round.

A round screens the uploads (:mod:`.faults`), and if at least ``min_clients`` remain, runs the aggregator on every
layer with ``p_k`` the clients' shares of the examples. FLoRA's stacked updates are merged into the base: the server
keeps their running sum as exact factors (re-factorised once their rank passes the layer's), which stateless
clients receive with the adapter.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..io.files import atomic_write, read_json, write_json
from ..merging.rules import cat, refactor
from ..train.evaluate import evaluate
from .aggregators import LayerRound, aggregation_error
from .client import ClientResult, prepare_model
from .client_dp import privatise
from .faults import Excluded, screen
from .layers import Layers, flatten, nbytes, unflatten
from .privacy import PrivacyLedger
from .setup import Federation

STATE_FILE, SERVER_FILE = "federation.safetensors", "federation.json"
MERGED_UP, MERGED_DOWN = "merged_up", "merged_down"


@dataclass
class RoundReport:
    """What one round did."""

    round: int
    sampled: list[int]
    kept: list[int]
    excluded: list[Excluded]
    applied: bool
    up_bytes: dict[int, int] = field(default_factory=dict)  # per client that uploaded
    down_bytes: int = 0  # per client: the global state it was sent (clients are stateless)
    down_changed_bytes: int = 0  # per client: what changed since the last round (what a stateful client needs)
    aggregation_error: float = 0.0  # max over layers of ||global update - sum p_k delta_k|| / ||sum p_k delta_k||
    epsilon: float = 0.0  # the largest privacy spent by any client so far (DP-SGD runs)
    client_epsilon: float = 0.0  # client-level privacy spent so far (DP-FedAvg runs)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["excluded"] = [{"client": e.client, "reason": e.reason} for e in self.excluded]
        out["up_bytes"] = {str(k): v for k, v in self.up_bytes.items()}
        return out


class FederatedServer:
    """The global state of a federation over ``fed`` (the server process's model and data)."""

    def __init__(self, fed: Federation) -> None:
        self.fed, self.config = fed, fed.config
        self.seed_state = fed.seed_state()
        self.state = fed.initial_state()
        self.scale = float(getattr(fed.adapter_config(), "scale", 1.0))
        self.merged: dict[str, tuple[Tensor, Tensor]] = {}
        self.view = {p: dict(r) for p, r in self.seed_state.items()}  # what a stateful client would hold
        self.increment = 0  # bytes of the last round's merged update (FLoRA)
        self.round = 0
        self.ledgers = {k: PrivacyLedger() for k in range(self.config.clients)}
        self.client_ledger = PrivacyLedger()

    # -- what clients receive ------------------------------------------------------------------------
    def payload(self) -> Layers:
        """The global tensors that differ from the shared-seed adapter (a client rebuilds the rest itself)."""
        return {path: {role: t for role, t in roles.items() if not torch.equal(t, self.seed_state[path][role])}
                for path, roles in self.state.items()}

    def down_bytes(self) -> int:
        merged = {p: {MERGED_UP: up, MERGED_DOWN: down} for p, (up, down) in self.merged.items()}
        return nbytes(self.payload()) + nbytes(merged)

    def changed_bytes(self) -> int:
        """Bytes a client that kept last round's state needs now (the roles that changed, FLoRA's new stack); moves
        that state forward."""
        changed = {p: {r: t for r, t in roles.items() if not torch.equal(t, self.view[p][r])}
                   for p, roles in self.state.items()}
        self.view = {p: dict(r) for p, r in self.state.items()}
        return nbytes(changed) + self.increment

    def expected(self, client: int) -> dict[str, dict[str, tuple[int, ...]]]:
        """The shapes client ``client`` must upload (its own rank for FLoRA)."""
        rule, rank = self.config.rule, self.config.rank_of(client)
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for path, roles in self.state.items():
            shapes[path] = {}
            for role in rule.sends:
                shape = tuple(roles[role].shape)
                if rule.fresh and role == "A":
                    shape = (rank, *shape[1:])
                elif rule.fresh and role == "B":
                    shape = (shape[0], rank, *shape[2:])
                shapes[path][role] = shape
        return shapes

    # -- a round -------------------------------------------------------------------------------------
    def aggregate(self, round_: int, sampled: list[int], results: Mapping[int, ClientResult],
                  failures: Mapping[int, str]) -> RoundReport:
        """Aggregate round ``round_``'s uploads (``failures``: clients that sent none, and why)."""
        started = time.perf_counter()
        clients = sorted(results)
        uploads = [results[k].upload for k in clients]
        reference = None if self.config.rule.fresh else self.state
        kept_pos, excluded_pos = screen(uploads, [self.expected(k) for k in clients], reference,
                                        self.config.max_update_ratio)
        kept = [clients[i] for i in kept_pos]
        excluded = [Excluded(clients[e.client], e.reason) for e in excluded_pos]
        excluded += [Excluded(k, reason) for k, reason in failures.items()]
        report = RoundReport(round_, sampled, kept, sorted(excluded, key=lambda e: e.client),
                             len(kept) >= self.config.min_clients,
                             {k: nbytes(results[k].upload) for k in clients}, self.down_bytes(),
                             self.changed_bytes())
        if report.applied:
            kept_results = [results[k] for k in kept]
            if self.config.client_privacy is not None:
                kept_results = self._client_level_dp(round_, kept_results, len(sampled))
            report.aggregation_error = self._apply(round_, kept_results, kept)
        self._account_privacy(kept)
        if self.config.client_privacy is not None:
            report.client_epsilon = self.client_ledger.epsilon(self.config.client_privacy.delta)
        report.epsilon = max((ledger.epsilon(self.config.privacy.delta) for ledger in self.ledgers.values()),
                             default=0.0) if self.config.privacy else 0.0
        self.round = round_
        report.seconds = time.perf_counter() - started
        return report

    def _apply(self, round_: int, results: list[ClientResult], kept: list[int]) -> float:
        rule, error = self.config.rule, 0.0
        self.increment = 0
        weights = [float(r.examples) for r in results]
        scales = [float(getattr(self.fed.adapter_config(self.config.rank_of(k)), "scale", 1.0)) if rule.fresh
                  else self.scale for k in kept]
        for path, current in self.state.items():
            layer = LayerRound(current, [r.upload[path] for r in results], weights, scales, self.scale, round_,
                               dict(self.config.aggregator_options))
            result = rule.fn(layer)
            error = max(error, aggregation_error(layer, result))
            current.update({role: t.detach().clone() for role, t in result.tensors.items()})
            if result.merged is not None:
                self._merge(path, result.merged)
        return error

    def _merge(self, path: str, update: tuple[Tensor, Tensor]) -> None:
        """Add ``update`` to the running sum of merged updates of ``path`` (kept exact and at most full rank)."""
        self.increment += sum(t.numel() * t.element_size() for t in update)
        total = update if path not in self.merged else cat([self.merged[path], update], [1.0, 1.0])
        up, down = total
        if down.shape[0] > min(up.shape[0], down.shape[1]):
            up, down = refactor((up, down), rank=min(up.shape[0], down.shape[1]))
        self.merged[path] = (up.contiguous(), down.contiguous())

    def _client_level_dp(self, round_: int, results: list[ClientResult], sampled: int) -> list[ClientResult]:
        """DP-FedAvg (:mod:`.client_dp`): clipped uploads with equal weights, noise through the mean; one Gaussian
        release per round at sampling rate ``sampled / clients``."""
        privacy, config = self.config.client_privacy, self.config
        rate = sampled / config.clients
        sigma = privacy.resolve(rate, config.rounds)
        generator = torch.Generator().manual_seed(config.options.seed * 1_000_003 + round_)
        uploads = privatise([r.upload for r in results], self.state, privacy.max_grad_norm, sigma, generator)
        self.client_ledger.record(sigma, rate, 1)
        return [ClientResult(u, 1) for u in uploads]

    def _account_privacy(self, kept: list[int]) -> None:
        """Each client that trained this round spent ``local_steps`` DP-SGD steps at its sampling rate."""
        privacy = self.config.privacy
        if privacy is None:
            return
        for k in kept:
            shard = len(self.fed.shards[k])
            rate = min(self.config.options.batch_size, shard) / shard
            total = self.config.rounds * self.config.local_steps
            self.ledgers[k].record(privacy.resolve(rate, total), rate, self.config.local_steps)

    # -- evaluation and files -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The global model's metrics on the held-out examples."""
        prepare_model(self.fed, self.payload(), self.merged, None, None)
        opts = self.config.options
        return evaluate(self.fed.model, self.fed.task, self.fed.held_out, opts.eval_batch_size, desc="eval global")

    def save(self, folder: Path) -> None:
        """Checkpoint the global state (atomically: tensors, then the JSON that names the round)."""
        tensors = flatten(self.state)
        for path, (up, down) in self.merged.items():
            tensors.update(flatten({path: {MERGED_UP: up, MERGED_DOWN: down}}))
        atomic_write(folder / STATE_FILE, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        write_json(folder / SERVER_FILE, {"round": self.round, "config": self.config.key(),
                                          "ledgers": {str(k): v.to_list() for k, v in self.ledgers.items()},
                                          "client_ledger": self.client_ledger.to_list()})

    def load(self, folder: Path) -> None:
        """Continue from :meth:`save`'s files."""
        meta = read_json(folder / SERVER_FILE)
        layers = unflatten(load_file(folder / STATE_FILE))
        self.merged = {p: (r.pop(MERGED_UP), r.pop(MERGED_DOWN)) for p, r in layers.items() if MERGED_UP in r}
        for path, roles in layers.items():
            self.state[path].update(roles)
        self.round = int(meta["round"])
        self.ledgers = {int(k): PrivacyLedger.from_list(v) for k, v in meta["ledgers"].items()}
        self.client_ledger = PrivacyLedger.from_list(meta["client_ledger"])
