"""Low-rank multi-head attention over GRU states (Mehta et al., 2019; METHODS.md entry 69; application-only).

A bidirectional GRU reads the text into states ``h_t`` (T, D). Instead of per-head projections (Transformer) or
dense word-to-word queries, every head ``j`` scores word ``t`` against one global context vector ``c`` through a
bilinear affinity ``h_t^T W_j c`` whose matrices share a rank-``r`` factorisation ``W_j = U diag(p_j) V^T``:

    f_t   = P^T ( tanh(U^T h_t) ∘ tanh(V^T c) ) + b      (heads,)      U, V (D, r), P (r, heads)
    a_j   = softmax_t f_{t, j}                            one distribution over the words per head
    s     = concat_j ( sum_t a_{t, j} h_t )               (heads D,)  -> linear classifier

(the low-rank bilinear pooling form, tanh after each factor). The heads differ only by a column of ``P``, so the
attention costs ``2 D r + D + (r + 1) heads`` parameters against ``heads (D^2 + 2 D)`` for per-head
``v_j^T tanh(W_j h_t + b_j)`` attention, and O(T) scores per head instead of O(T^2).

Assumed (the abstract gives no equations): the context vector ``c`` is a learned parameter (as in hierarchical
attention networks), tanh is the non-linearity, and the heads are concatenated. :func:`train_on_tweets` trains it
on ``[{"text", "label"}]`` records with a whitespace vocabulary; pass ``lorakit.train.default.default_records()``
for the embedded tweets (not imported here: ``compress`` sits below ``train``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import require

PAD, UNK = 0, 1


class LowRankMHSA(nn.Module):
    """The attention: states (B, T, D) and mask (B, T) -> pooled (B, heads, D), weights (B, heads, T)."""

    def __init__(self, dim: int, heads: int, rank: int) -> None:
        super().__init__()
        require(heads >= 1, "heads", heads, "must be >= 1")
        require(rank >= 1, "rank", rank, "must be >= 1")
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(dim, rank, bias=False)
        self.context = nn.Parameter(torch.randn(dim))                            # c (D,)
        self.p = nn.Linear(rank, heads)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        joint = torch.tanh(self.u(h)) * torch.tanh(self.v(self.context))         # (B, T, r)
        scores = self.p(joint).transpose(1, 2)                                    # (B, heads, T)
        weights = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1)
        return weights @ h, weights                                               # (B, heads, D), (B, heads, T)


class LowRankMHSAClassifier(nn.Module):
    """Embedding -> bidirectional GRU -> :class:`LowRankMHSA` -> linear classifier over the concatenated heads."""

    def __init__(self, vocab: int, embed: int, hidden: int, heads: int, rank: int, classes: int) -> None:
        super().__init__()
        require(vocab > UNK, "vocab", vocab, f"must be > {UNK} (ids {PAD} and {UNK} are padding and unknown)")
        require(classes >= 2, "classes", classes, "must be >= 2")
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.gru = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)
        self.attention = LowRankMHSA(2 * hidden, heads, rank)
        self.classifier = nn.Linear(heads * 2 * hidden, classes)

    def attend(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, T) padded with 0 -> pooled (B, heads, 2 hidden), attention weights (B, heads, T)."""
        mask = ids != PAD                                                         # (B, T)
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=ids.shape[1])
        return self.attention(states, mask)                                       # states (B, T, 2 hidden)

    def forward(self, ids: Tensor) -> Tensor:
        return self.classifier(self.attend(ids)[0].flatten(1))                    # (B, classes)


def build_vocab(texts: Sequence[str]) -> dict[str, int]:
    """Whitespace tokens (lower-cased) in order of first appearance -> ids from 2 (0 padding, 1 unknown)."""
    vocab: dict[str, int] = {}
    for text in texts:
        for token in text.lower().split():
            vocab.setdefault(token, len(vocab) + 2)
    return vocab


def encode(texts: Sequence[str], vocab: Mapping[str, int], max_len: int = 32) -> Tensor:
    """Token ids (B, T) padded with 0; unknown words are 1, an empty text is one unknown token."""
    rows = [[vocab.get(t, UNK) for t in text.lower().split()][:max_len] or [UNK] for text in texts]
    ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids


@dataclass
class TrainedClassifier:
    """A trained classifier with its vocabulary, class names and held-out accuracy."""

    model: LowRankMHSAClassifier
    vocab: dict[str, int]
    labels: list[Any]
    max_len: int
    accuracy: float = 0.0

    def predict(self, texts: Sequence[str]) -> list[Any]:
        self.model.eval()
        with torch.no_grad():
            return [self.labels[i] for i in self.model(encode(texts, self.vocab, self.max_len)).argmax(-1).tolist()]


def train_on_tweets(steps: int, records: Sequence[Mapping[str, Any]], *, embed: int = 32, hidden: int = 32,
                    heads: int = 4, rank: int = 8, lr: float = 1e-2, batch: int = 32, holdout: float = 0.2,
                    max_len: int = 32, seed: int = 0) -> TrainedClassifier:
    """Train on ``records`` (``{"text": str, "label": hashable}``) for ``steps`` Adam steps; the vocabulary comes
    from the training split only, the accuracy from the held-out ``holdout`` fraction."""
    require(steps >= 1, "steps", steps, "must be >= 1")
    require(0 < holdout < 1, "holdout", holdout, "must be in (0, 1)")
    require(len(records) >= 2 and all("text" in r and "label" in r for r in records), "records",
            f"{len(records)} records", 'must be >= 2 dicts with "text" and "label"')
    order = list(records)
    random.Random(seed).shuffle(order)
    cut = max(1, min(len(order) - 1, round(len(order) * (1 - holdout))))
    train, held = order[:cut], order[cut:]
    labels = sorted({r["label"] for r in records}, key=str)
    index = {label: i for i, label in enumerate(labels)}
    vocab = build_vocab([r["text"] for r in train])
    torch.manual_seed(seed)
    model = LowRankMHSAClassifier(len(vocab) + 2, embed, hidden, heads, rank, max(2, len(labels)))
    ids = encode([r["text"] for r in train], vocab, max_len)                      # (N, T)
    target = torch.tensor([index[r["label"]] for r in train])                    # (N,)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(train), (min(batch, len(train)),), generator=g)
        loss = F.cross_entropy(model(ids[pick]), target[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = TrainedClassifier(model, vocab, labels, max_len)
    trained.accuracy = sum(p == r["label"] for p, r in zip(trained.predict([r["text"] for r in held]), held)) \
        / len(held)
    return trained
