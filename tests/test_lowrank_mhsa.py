"""Low-rank MHSA (lorakit.compress.lowrank_mhsa): per-head attention distributions, fewer parameters than per-head
attention, and a GRU classifier that finds a label-deciding keyword. Synthetic records only."""
from __future__ import annotations

import random
import time

import pytest
import torch
from torch import Tensor, nn

from lorakit.compress.lowrank_mhsa import LowRankMHSA, LowRankMHSAClassifier, build_vocab, encode, train_on_tweets
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

FILLER = "the a cat dog sat ran on under big small red blue day night road tree house car bird sky".split()


class PerHeadAttention(nn.Module):
    """The reference: each head its own ``v_j^T tanh(W_j h + b_j)`` scorer."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.w = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
        self.v = nn.ParameterList(nn.Parameter(torch.randn(dim)) for _ in range(heads))


def keyword_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The label is "pos" iff the sentence contains "great" (anywhere); else "awful" appears."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=rng.randint(3, 9))
        words.insert(rng.randint(0, len(words)), "great" if label == "pos" else "awful")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_heads_are_distributions_that_differ():
    torch.manual_seed(0)
    model = LowRankMHSAClassifier(vocab=30, embed=8, hidden=8, heads=4, rank=4, classes=3)
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [2, 3, 4, 10, 11, 12, 13]])
    pooled, weights = model.attend(ids)
    assert pooled.shape == (2, 4, 16) and weights.shape == (2, 4, 7) and model(ids).shape == (2, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4), atol=1e-6)
    assert (weights[0, :, 5:] == 0).all()                           # padding gets no attention

    att = LowRankMHSA(dim=16, heads=4, rank=8)
    h, mask = 2 * torch.randn(3, 10, 16), torch.ones(3, 10, dtype=torch.bool)
    weights = att(h, mask)[1]
    gaps = (weights.unsqueeze(1) - weights.unsqueeze(2)).abs().sum(-1)     # (B, heads, heads) L1 between heads
    assert (gaps[:, ~torch.eye(4, dtype=torch.bool)] > 0.05).all()
    with torch.no_grad():                                           # heads differ only through P's columns
        att.p.weight.copy_(att.p.weight[:1].expand(4, -1))
        att.p.bias.fill_(0.3)
    same = att(h, mask)[1]
    assert torch.allclose(same, same[:, :1].expand_as(same))


def test_pooling_matches_a_direct_computation():
    torch.manual_seed(1)
    att = LowRankMHSA(dim=6, heads=3, rank=2)
    h, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    pooled, weights = att(h, mask)
    scores = torch.stack([att.p(torch.tanh(att.u.weight @ h[0, t]) * torch.tanh(att.v.weight @ att.context))
                          for t in range(5)], 1)                   # (heads, T) for the first example
    assert torch.allclose(weights[0], scores.softmax(-1), atol=1e-6)
    assert torch.allclose(pooled[0], weights[0] @ h[0], atol=1e-6)


def test_fewer_parameters_than_per_head_attention():
    dim, heads, rank = 64, 8, 8
    low = LowRankMHSA(dim, heads, rank)
    assert count(low) == 2 * dim * rank + dim + (rank + 1) * heads
    assert count(low) < count(PerHeadAttention(dim, heads)) / 10


def test_classifier_learns_the_keyword_quickly():
    start = time.perf_counter()
    trained = train_on_tweets(150, keyword_records(300), embed=16, hidden=16, heads=2, rank=4, lr=2e-2, seed=0)
    assert time.perf_counter() - start < 3.0
    assert trained.accuracy > 0.9
    assert trained.predict(["dog great road sky", "awful tree car"]) == ["pos", "neg"]


def test_vocab_encoding_and_errors():
    vocab = build_vocab(["A b", "b c"])
    assert vocab == {"a": 2, "b": 3, "c": 4}
    ids: Tensor = encode(["c zzz", ""], vocab)
    assert ids.tolist() == [[4, 1], [1, 0]]
    with pytest.raises(ConfigError, match="records"):
        train_on_tweets(1, [{"text": "x"}])
    with pytest.raises(ConfigError, match="heads"):
        LowRankMHSA(4, 0, 2)
