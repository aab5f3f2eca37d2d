"""SLTrain: the paper's parameter count, forward == (s B A + S_dense) x, gradients only on the fixed support, the
support never changes while training, and the module swap keeps the output head."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.errors import ConfigError
from lorakit.optim.sltrain import SparseLowRankLinear, sltrain


def layer(bias: bool = True) -> SparseLowRankLinear:
    return SparseLowRankLinear(20, 12, rank=3, density=0.1, bias=bias, alpha=6.0,
                               generator=torch.Generator().manual_seed(0))


def dense_reference(m: SparseLowRankLinear) -> torch.Tensor:
    s = torch.zeros(m.out_features * m.in_features)
    s[m.support] = m.values.detach()
    return 2.0 * m.lora_B.detach() @ m.lora_A.detach() + s.view(m.out_features, m.in_features)


def test_parameter_count_is_r_m_plus_n_plus_delta_m_n() -> None:
    m = layer(bias=False)
    assert sum(p.numel() for p in m.parameters()) == 3 * (20 + 12) + round(0.1 * 20 * 12)
    assert m.support.unique().numel() == m.support.numel() == 24


def test_forward_and_gradients_match_the_dense_reference() -> None:
    m = layer()
    x = torch.randn(2, 5, 20, requires_grad=True)
    w = dense_reference(m).requires_grad_(True)
    expected = x @ w.T + m.bias
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m.weight(), w.detach())
    grad_out = torch.randn(2, 5, 12)
    m(x).backward(grad_out)
    gx = x.grad.clone()
    x.grad = None
    expected.backward(grad_out)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(m.values.grad, w.grad.view(-1)[m.support])  # gradient only on the support
    torch.testing.assert_close(m.lora_B.grad, 2.0 * w.grad @ m.lora_A.detach().T)
    torch.testing.assert_close(m.lora_A.grad, 2.0 * m.lora_B.detach().T @ w.grad)


def test_the_support_stays_fixed_and_off_support_entries_stay_low_rank_while_training() -> None:
    m = layer()
    support = m.support.clone()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(5):
        m(torch.randn(4, 20)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(m.support, support)
    assert not any(p is m.support for p in m.parameters())
    off = torch.ones(12 * 20, dtype=torch.bool)
    off[support] = False
    low_rank = 2.0 * m.lora_B.detach() @ m.lora_A.detach()
    torch.testing.assert_close(m.weight().detach().view(-1)[off], low_rank.view(-1)[off])


def test_sltrain_swaps_every_linear_but_the_head() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    replaced = sltrain(model, rank=4, density=0.05)
    assert len(replaced) == 2 * 7 and isinstance(model.lm_head, nn.Linear)
    ids = torch.randint(0, 40, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SparseLowRankLinear) and q.values.grad is not None
    with pytest.raises(ConfigError, match="matches no"):
        sltrain(model, rank=4, targets="nothing")
    with pytest.raises(ConfigError, match="rank"):
        SparseLowRankLinear(4, 4, rank=5, density=0.1)
