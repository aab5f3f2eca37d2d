"""A federation's settings and what every process builds from them: the model, the task, the held-out split, each
client's shard of the training examples, and the adapter each client trains.

Every process (the server, each Flower simulation actor) builds the same :class:`Federation` from the same
:class:`FederationConfig`: data splits and the shared adapter seed are deterministic, so clients agree on every
frozen tensor without receiving it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, require
from ..inject import adapt, configs, delete_adapter
from ..train.data import Record
from ..train.errors import DataError
from ..train.model import load_model
from ..train.options import Options
from ..train.run import adapter_config, prepare_data, records_of
from ..train.tasks import ClassificationTask, Example, Task
from ..train.warm_start import initialize_from_task, needs_data
from .aggregators import AGGREGATORS, Aggregator
from .layers import base_weights, layer_tensors, load_tensors
from .partition import parse_partition, partition
from .privacy import PrivacyConfig

ADAPTER = "default"
FAULTS = ("drop", "nan", "shape", "huge", "slow")  # --inject-faults kinds: how a client misbehaves
ENGINES = ("inprocess", "flower")


@dataclass(frozen=True)
class FederationConfig:
    """Settings of a federated fine-tune (``lorakit federate``); ``options`` holds the model, data, adapter and
    optimiser settings of every client (``options.steps`` is unused: ``local_steps`` per round)."""

    options: Options = field(default_factory=Options)
    aggregator: str = "fedavg"
    clients: int = 8
    rounds: int = 10
    local_steps: int = 10
    partition: str = "dirichlet:0.3"
    fraction: float = 1.0  # share of clients sampled each round
    min_clients: int = 2  # a round with fewer valid uploads leaves the global adapter unchanged
    client_ranks: tuple[int, ...] = ()  # FLoRA: per-client ranks (cycled over clients); empty: options.rank
    aggregator_options: Mapping[str, Any] = field(default_factory=dict)
    prox_mu: float = 0.0  # FedProx: (mu / 2) ||theta - theta_global||^2 in every client's loss
    privacy: PrivacyConfig | None = None  # DP-SGD on every client (example-level)
    client_privacy: PrivacyConfig | None = None  # DP-FedAvg on the server (client-level; max_grad_norm clips updates)
    server_examples: int = 64  # training examples kept by the server for a data-driven init (Fed-SB's LoRA-SB)
    max_update_ratio: float = 100.0  # exclude an update this many times the round's median norm
    client_timeout: float = 600.0  # seconds a client may take before its reply is dropped
    engine: str = "inprocess"
    inject_faults: Mapping[int, str] = field(default_factory=dict)  # client -> a FAULTS kind (fault-handling drills)

    def __post_init__(self) -> None:
        aggregator = AGGREGATORS.get(self.aggregator)
        require(self.clients >= 1, "clients", self.clients, "must be >= 1")
        require(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        require(self.local_steps >= 1, "local_steps", self.local_steps, "must be >= 1")
        require(0 < self.fraction <= 1, "fraction", self.fraction, "must be in (0, 1]")
        require(1 <= self.min_clients <= self.clients, "min_clients", self.min_clients,
                f"must be between 1 and --clients {self.clients}")
        require(self.prox_mu >= 0, "prox_mu", self.prox_mu, "must be >= 0")
        require(self.max_update_ratio > 1, "max_update_ratio", self.max_update_ratio, "must be > 1")
        require(self.client_timeout > 0, "client_timeout", self.client_timeout, "must be > 0")
        require(self.server_examples >= 0, "server_examples", self.server_examples, "must be >= 0")
        require(self.engine in ENGINES, "engine", self.engine, f"must be one of {ENGINES}")
        require(all(isinstance(r, int) and r >= 1 for r in self.client_ranks), "client_ranks", self.client_ranks,
                "must be positive integers")
        require(not self.client_ranks or aggregator.fresh, "client_ranks", self.client_ranks,
                f"heterogeneous ranks need an aggregator that stacks them (flora), not {self.aggregator!r}")
        for client, kind in self.inject_faults.items():
            require(kind in FAULTS, f"inject_faults[{client}]", kind, f"must be one of {FAULTS}")
            require(0 <= client < self.clients, "inject_faults", client, f"client ids are 0..{self.clients - 1}")
        require(self.client_privacy is None or aggregator.averaging, "client_privacy", self.aggregator,
                "client-level DP needs an aggregator that uses only the mean of the uploads (fedavg, ffa-lora, fed-sb, "
                "fedsvd); this one uses each client's update itself")
        parse_partition(self.partition)
        if self.options.method != "lora" and self.options.method != aggregator.method:
            raise ConfigError(f"--method {self.options.method!r}: aggregator {self.aggregator!r} trains "
                              f"{aggregator.method!r} adapters (leave --method at its default)")

    @property
    def rule(self) -> Aggregator:
        return AGGREGATORS.get(self.aggregator)

    def rank_of(self, client: int) -> int:
        return self.client_ranks[client % len(self.client_ranks)] if self.client_ranks else self.options.rank

    def key(self) -> str:
        """A stable text identity (caches, checkpoints)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


@dataclass
class Federation:
    """What one process builds from a :class:`FederationConfig`."""

    config: FederationConfig
    model: nn.Module
    task: Task
    shards: list[list[Example]]
    held_out: list[Example]
    server_examples: list[Example]
    _seed_state: dict[str, dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _originals: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def adapter_config(self, rank: int | None = None) -> Any:
        """The config of the adapter clients train (the aggregator's method at ``rank``)."""
        opts = dataclasses.replace(self.config.options, method=self.config.rule.method,
                                   rank=rank or self.config.options.rank)
        if self.config.rule.init is not None and opts.init is None:
            opts = dataclasses.replace(opts, init=self.config.rule.init)  # Fed-SB: LoRA-SB's core
        return adapter_config(opts)

    def fresh_adapter(self, rank: int | None = None, seed: int | None = None) -> None:
        """Adapter ``default`` as built from the shared seed (or, rebuilt, from ``seed`` at ``rank``).

        The shared-seed adapter is built once per process and afterwards reset from a copy of its tensors: building
        it again would redo its initialiser (LoRA-XS's SVD of every weight)."""
        if seed is None and rank is None and self._seed_state is not None and ADAPTER in configs(self.model):
            load_tensors(self.model, ADAPTER, self._seed_state)
            return
        if ADAPTER in configs(self.model):
            delete_adapter(self.model, ADAPTER)
        torch.manual_seed(self.config.options.seed if seed is None else seed)
        adapt(self.model, self.adapter_config(rank), ADAPTER, dtype=torch.float32)
        self._seed_state = layer_tensors(self.model, ADAPTER) if seed is None and rank is None else None

    def seed_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The shared-seed adapter's tensors (what every client rebuilds without receiving them)."""
        self.fresh_adapter()
        return self._seed_state

    def original_weights(self) -> dict[str, torch.Tensor]:
        """The adapted layers' frozen weights before any FLoRA merge (copied on first use)."""
        if self._originals is None:
            self._originals = base_weights(self.model, ADAPTER)
        return self._originals

    def initial_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The global adapter before round 1: the shared-seed adapter, data-initialised on the server's examples
        when the method needs it (Fed-SB's LoRA-SB)."""
        self.fresh_adapter()
        if needs_data(self.model):
            require(len(self.server_examples) > 0, "server_examples", 0,
                    f"must be > 0: {self.config.aggregator!r} initialises from data kept by the server")
            opts = self.config.options
            initialize_from_task(self.model, self.task, self.server_examples, opts.batch_size, opts.init_batches,
                                 opts.seed)
        return layer_tensors(self.model, ADAPTER)


def _labels(task: Task, examples: list[Example]) -> list[Any]:
    return [e.label if isinstance(task, ClassificationTask) else 0 for e in examples]


def build_federation(config: FederationConfig) -> Federation:
    """Load the model and data and split the training examples: the server's few first, then one shard per client
    (``config.partition``: IID, or Dirichlet over the classification labels)."""
    opts = config.options
    records: list[Record] = records_of(opts)
    model, tokenizer = load_model(opts.model, torch.float32)
    task, train, held_out = prepare_data(opts, tokenizer, records)
    server, rest = train[:config.server_examples], train[config.server_examples:]
    if len(rest) < config.clients:
        raise DataError(f"{len(rest)} training examples (after {config.server_examples} kept by the server) cannot "
                        f"be split among --clients {config.clients}")
    shards = partition(_labels(task, rest), config.clients, config.partition, opts.seed)
    return Federation(config, model, task, [[rest[i] for i in s] for s in shards], held_out, server)


_BUILT: dict[str, Federation] = {}


def federation(config: FederationConfig) -> Federation:
    """The process's :class:`Federation` for ``config`` (built once per process)."""
    key = config.key()
    if key not in _BUILT:
        _BUILT.clear()  # one federation per process at a time: models are large
        _BUILT[key] = build_federation(config)
    return _BUILT[key]
