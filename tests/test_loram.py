"""LoRAM: the pruned copy keeps (1 - ratio) of each MLP's channels, and an adapter trained on it recovers to the full
model exactly on the kept coordinates (zero elsewhere), loads there without shape errors, and non-factor methods
are refused."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.errors import LorakitError
from lorakit.inject import hosts, trainable_parameters
from lorakit.methods.base import build_config
from lorakit.optim.loram import prune_mlp_channels, recover_adapter


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))


def mlp_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)


def trained_small(method: str = "lora") -> tuple[LlamaForCausalLM, torch.nn.Module, object]:
    full = tiny()
    small, prune_map = prune_mlp_channels(full, ratio=0.25)
    lorakit.adapt(small, build_config(method, r=4, targets="all-linear"))
    opt = torch.optim.AdamW(trainable_parameters(small).values(), lr=1e-2)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        small(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return full, small, prune_map


def test_pruning_keeps_the_asked_fraction_and_leaves_the_original_alone() -> None:
    full = tiny()
    before = {k: v.clone() for k, v in full.state_dict().items()}
    small, prune_map = prune_mlp_channels(full, ratio=0.25)
    assert small.model.layers[0].mlp.gate_proj.weight.shape == (24, 16)
    assert small.model.layers[0].mlp.down_proj.weight.shape == (16, 24)
    assert mlp_params(small) == 0.75 * mlp_params(full)
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in before.items())
    rows, _ = prune_map.kept["model.layers.0.mlp.up_proj"]
    torch.testing.assert_close(small.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight[rows])
    small(input_ids=torch.randint(0, 40, (1, 5)))  # the pruned model runs


def test_recovered_adapter_is_exact_on_the_kept_coordinates_and_zero_elsewhere() -> None:
    full, small, prune_map = trained_small()
    recover_adapter(small, full, prune_map)
    full_hosts = {h.path: h for h in hosts(full)}
    for host in hosts(small):
        rows, cols = prune_map.kept.get(host.path, (None, None))
        a, b = host.adapters["default"].a, host.adapters["default"].b
        big = full_hosts[host.path].adapters["default"]
        assert b.abs().sum() > 0  # trained
        big_b = big.b if rows is None else big.b[rows]
        big_a = big.a if cols is None else big.a[:, cols]
        assert torch.equal(big_b, b) and torch.equal(big_a, a)
        small_dw = host.adapters["default"].delta_weight(host.backend)
        full_dw = big.delta_weight(full_hosts[host.path].backend)
        keep_rows = torch.zeros(full_dw.shape[0], dtype=torch.bool)
        keep_rows[rows if rows is not None else slice(None)] = True
        keep_cols = torch.zeros(full_dw.shape[1], dtype=torch.bool)
        keep_cols[cols if cols is not None else slice(None)] = True
        mask = keep_rows[:, None] & keep_cols[None, :]
        torch.testing.assert_close(full_dw[mask].view(small_dw.shape), small_dw, rtol=1e-6, atol=1e-7)
        assert torch.count_nonzero(full_dw[~mask]) == 0
    ids = torch.randint(0, 40, (1, 6))
    with lorakit.disable(full):
        base = full(input_ids=ids).logits
    assert not torch.allclose(full(input_ids=ids).logits, base)  # the recovered adapter is in use


def test_methods_that_zero_padding_does_not_preserve_are_refused() -> None:
    full, small, prune_map = trained_small("dora")
    with pytest.raises(LorakitError, match="not preserved"):
        recover_adapter(small, full, prune_map)


def test_bad_ratio_is_refused() -> None:
    with pytest.raises(lorakit.errors.ConfigError, match="ratio"):
        prune_mlp_channels(tiny(), ratio=1.0)
