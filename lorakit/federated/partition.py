"""How the training examples are split among simulated clients: IID, or non-IID by a Dirichlet over labels.

``dirichlet:alpha`` (Hsu et al., 2019): for every label, the shares of its examples going to each client are drawn
from ``Dir(alpha, ..., alpha)``; small ``alpha`` gives each client a few dominant labels. Clients left with no
example get one from the largest shard, so every client can train.
"""
from __future__ import annotations

import random
from typing import Hashable, Sequence

import numpy as np

from ..errors import ConfigError, require


def parse_partition(text: str) -> tuple[str, float | None]:
    """``"iid"`` or ``"dirichlet:ALPHA"`` (ALPHA > 0) -> ``(scheme, alpha)``."""
    if text == "iid":
        return "iid", None
    scheme, _, value = text.partition(":")
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if scheme != "dirichlet" or not alpha > 0:
        raise ConfigError(f"--partition {text!r} is not understood; use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 "
                          "(e.g. dirichlet:0.3; smaller is less IID)")
    return scheme, alpha


def partition(labels: Sequence[Hashable], clients: int, scheme: str = "iid", seed: int = 0) -> list[list[int]]:
    """Indices of ``labels`` for each of ``clients`` clients (disjoint, covering every index, none empty)."""
    require(clients >= 1, "clients", clients, "must be >= 1")
    require(len(labels) >= clients, "clients", clients, f"must be <= the {len(labels)} training examples")
    kind, alpha = parse_partition(scheme)
    rng = random.Random(seed)
    if kind == "iid":
        order = list(range(len(labels)))
        rng.shuffle(order)
        return [sorted(order[k::clients]) for k in range(clients)]
    draw = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(clients)]
    by_label: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    for label in sorted(by_label, key=str):
        members = by_label[label]
        rng.shuffle(members)
        shares = draw.dirichlet([alpha] * clients)  # (clients,)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for k, part in enumerate(np.split(np.array(members), cuts)):
            shards[k].extend(int(i) for i in part)
    for shard in shards:  # an empty client takes one example from the largest shard
        if not shard:
            shard.append(max(shards, key=len).pop())
    return [sorted(s) for s in shards]
