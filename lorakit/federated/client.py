"""One client's round: take the global adapter, train ``local_steps`` on the client's own shard, upload the trained
tensors.

The adapter is rebuilt from the shared seed and overwritten with what the server sent, so a process can serve any
client in any order (Flower's ClientApps are stateless; its simulation actors serve many virtual clients). FedProx
(Li et al., 2020) adds ``(mu / 2) ||theta - theta_global||^2`` to the local loss; DP-SGD (``privacy``) replaces the
plain step by Opacus' clipped, noised one (the server keeps each client's privacy ledger).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from ..inject import parameter_roles, trainable_parameters
from ..optim import build_optimizer
from ..train.data import BatchOrder
from ..train.errors import TrainingError
from .layers import Layers, add_to_base, load_tensors, trained_tensors
from .privacy import PrivateSteps
from .setup import ADAPTER, Federation


@dataclass
class ClientResult:
    """What a client sends back: its trained tensors, its number of examples and its metrics."""

    upload: Layers
    examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_model(fed: Federation, payload: Layers, merged: Mapping[str, tuple[Tensor, Tensor]], rank: int | None,
                  seed: int | None) -> None:
    """Set the model to the global state: base weights with the merged updates (FLoRA), adapter from the seed (or
    ``seed``) at ``rank``, overwritten with ``payload``."""
    fed.fresh_adapter(rank, seed)
    if fed.config.rule.fresh:
        originals = fed.original_weights()
        zero = {p: (w.new_zeros(w.shape[0], 0), w.new_zeros(0, w[0].numel())) for p, w in originals.items()}
        add_to_base(fed.model, ADAPTER, {**zero, **merged}, originals)
    load_tensors(fed.model, ADAPTER, payload)


def _prox(params: Mapping[str, torch.nn.Parameter], anchor: Mapping[str, Tensor], mu: float) -> Tensor:
    return 0.5 * mu * sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())


def local_train(fed: Federation, client: int, round_: int, payload: Layers,
                merged: Mapping[str, tuple[Tensor, Tensor]]) -> ClientResult:
    """Run client ``client``'s local steps of round ``round_`` from the global state; returns its upload."""
    config, opts = fed.config, fed.config.options
    rule = config.rule
    seed = opts.seed * 1_000_003 + round_ * 1009 + client if rule.fresh else None  # FLoRA: a fresh adapter per round
    prepare_model(fed, payload, merged, config.rank_of(client) if rule.fresh else None, seed)
    model, shard = fed.model, fed.shards[client]
    params = trainable_parameters(model, ADAPTER)
    anchor = {n: p.detach().clone() for n, p in params.items()} if config.prox_mu > 0 else {}
    optimizer = build_optimizer(opts.optimizer, params, lr=opts.lr, roles=parameter_roles(model),
                                **opts.optimizer_options)
    order = BatchOrder(len(shard), min(opts.batch_size, len(shard)), opts.seed * 7919 + client)
    private = None
    if config.privacy is not None:
        rate = order.batch / len(shard)
        sigma = config.privacy.resolve(rate, config.rounds * config.local_steps)
        private = PrivateSteps(optimizer, params, config.privacy, sigma, order.batch, seed)
    model.train()
    losses = []
    try:
        for step in range(config.local_steps):
            batch = [shard[i] for i in order.indices((round_ - 1) * config.local_steps + step)]
            losses.append(private.step(model, fed.task, batch) if private else _step(fed, params, anchor, optimizer,
                                                                                       batch))
    finally:
        model.eval()
    return ClientResult(trained_tensors(model, ADAPTER), len(shard), {"loss": sum(losses) / len(losses)})


def _step(fed: Federation, params: Mapping[str, torch.nn.Parameter], anchor: Mapping[str, Tensor],
          optimizer: torch.optim.Optimizer, batch: list) -> float:
    """One plain local step (FedProx term when ``anchor`` is given); returns the mean loss."""
    total = sum(e.weight for e in batch)
    sums = fed.task.loss_sums(fed.model, fed.task.collate(batch))
    loss = sums.loss / total
    if anchor:
        loss = loss + _prox(params, anchor, fed.config.prox_mu)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0))
    value = sums.loss.item() / total
    if not (math.isfinite(value) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"local loss is {value} (gradient norm {norm}); lower --lr")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value
