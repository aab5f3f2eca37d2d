"""CTR low-rank compression (lorakit.compress.ctr): output-feature PCA is exact at full rank and loses only the
discarded eigenvalues, factorised lookups keep their semantics, and a factorised CTR model matches the dense one's AUC
with fewer parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.compress.ctr import (
    CTRConfig,
    CTRModel,
    FactorisedEmbedding,
    auc,
    compress_ctr,
    output_pca,
    parameter_count,
    pca_compress,
    svd_embedding,
    synthetic_clicks,
    train_ctr,
)
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = (20,) * 5


def low_rank_inputs(rank: int, n: int = 2000, width: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, width, generator=g) \
        + 0.01 * torch.randn(n, width, generator=g)


def test_pca_at_full_rank_reproduces_the_outputs():
    layer = nn.Linear(24, 10)
    x = torch.randn(300, 24)
    assert torch.allclose(pca_compress(layer, x, 10)(x), layer(x), atol=1e-5)


def test_pca_at_the_true_rank_keeps_the_output_variance():
    layer, x = nn.Linear(24, 16), low_rank_inputs(rank=4)
    y = layer(x).detach()
    total = (y - y.mean(0)).pow(2).sum(1).mean()
    lost = {k: float((pca_compress(layer, x, k)(x).detach() - y).pow(2).sum(1).mean() / total) for k in (3, 4)}
    assert lost[4] < 0.01 < lost[3]                                # the true rank keeps > 99%, one less does not
    _, values, _ = output_pca(layer, x)
    assert lost[4] == pytest.approx(float(values[4:].sum() / total), rel=1e-3)   # = the discarded eigenvalues


def test_factorised_lookup_semantics():
    table = FactorisedEmbedding(7, 5, 3)
    ids = torch.tensor([[0, 6], [3, 3]])
    assert torch.allclose(table(ids), table.weight()[ids], atol=1e-6)
    dense = nn.Embedding(7, 5)
    assert torch.allclose(svd_embedding(dense, 5).weight(), dense.weight, atol=1e-5)
    assert torch.linalg.matrix_rank(svd_embedding(dense, 2).weight().detach()) == 2


def test_auc_against_all_pairs():
    g = torch.Generator().manual_seed(3)
    scores, labels = torch.randint(0, 6, (40,), generator=g).float(), torch.randint(0, 2, (40,), generator=g)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    assert auc(scores, labels) == pytest.approx(float(pairs.mean()))
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    with pytest.raises(ConfigError, match="labels"):
        auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1]))


def test_factorised_model_matches_dense_auc_with_fewer_parameters():
    x, y = synthetic_clicks(FIELDS, 20000, rank=3, seed=0)
    train, held = slice(0, 16000), slice(16000, None)
    scores = {}
    models = {}
    for name, config in {"dense": CTRConfig(FIELDS, embed_dim=8),
                         "factorised": CTRConfig(FIELDS, embed_dim=8, embed_rank=4, mlp_rank=8)}.items():
        torch.manual_seed(0)
        models[name] = model = CTRModel(config)
        losses = train_ctr(model, x[train], y[train], steps=400, lr=2e-2)
        assert sum(losses[-20:]) < sum(losses[:20])
        model.eval()
        with torch.no_grad():
            scores[name] = auc(model(x[held]), y[held])
    assert scores["dense"] > 0.75                                  # the data has learnable structure
    assert scores["factorised"] > scores["dense"] - 0.02, scores
    assert parameter_count(models["factorised"]) < 0.5 * parameter_count(models["dense"])

    small = compress_ctr(models["dense"], x[train], embed_rank=4, mlp_rank=8)   # SVD + output PCA of the dense
    small.eval()
    with torch.no_grad():
        compressed = auc(small(x[held]), y[held])
    assert compressed > scores["dense"] - 0.02 and parameter_count(small) < parameter_count(models["dense"])


def test_config_is_validated():
    with pytest.raises(ConfigError, match="fields"):
        CTRConfig((10,))
    with pytest.raises(ConfigError, match="mlp_rank"):
        CTRConfig(FIELDS, mlp_rank=0)
