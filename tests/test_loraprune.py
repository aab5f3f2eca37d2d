"""LoRAPrune (lorakit.compress.loraprune): LoRA-guided importance, the iterative schedule, merge-compatible masks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import tiny_llama

import lorakit
from lorakit.compress.loraprune import (
    LoraPrune,
    apply_masks,
    find_structures,
    linear_rows,
    lora_importance,
    magnitude_importance,
    prune_masks,
)
from lorakit.errors import ConfigError
from lorakit.hooks import HookList

pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def adapted(seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, alpha=8, init="random"))  # every Linear but the head, B != 0
    return model


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS, labels=IDS).loss


def test_importance_is_the_lora_estimate_of_the_dense_gradient() -> None:
    model = adapted()
    dense = copy.deepcopy(model)
    loss_of(model).backward()
    structures = find_structures(model)
    got = lora_importance(model, "default", structures)
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if "adapters" not in n)

    # reference, only here: the dense gradient G of the merged weight (W has requires_grad in this copy)
    hosts = {h.path: h for h in lorakit.inject.hosts(dense)}
    for host in hosts.values():
        host.base_layer.weight.requires_grad_(True)
    loss_of(dense).backward()
    for s in structures:
        want = torch.zeros(s.groups)
        for m in s.members:
            host = hosts[m.path]
            lora = host.adapters["default"]
            a, b, sc = lora.a.detach(), lora.b.detach(), lora.scale
            g = host.base_layer.weight.grad  # dL/dW = dL/dW'
            estimate = sc * ((sc * g @ a.T) @ a + b @ (sc * b.T @ g))  # s (dL/dB A + B dL/dA)
            element = ((host.base_layer.weight.detach() + sc * b @ a) * estimate).abs()
            want += element.sum(1 - m.axis).reshape(s.groups, m.width).sum(1)
        torch.testing.assert_close(got[s.name], want, rtol=1e-4, atol=1e-7)
        assert bool((want > 0).all())


def test_magnitude_baseline_is_the_merged_weight_magnitude() -> None:
    model = adapted()
    structure = linear_rows(model, "model.layers.0.mlp.up_proj")
    host = model.get_submodule(structure.name)
    lora = host.adapters["default"]
    merged = host.base_layer.weight + lora.scale * lora.b @ lora.a
    torch.testing.assert_close(magnitude_importance(model, [structure], "default")[structure.name],
                               merged.detach().abs().sum(1))
    torch.testing.assert_close(magnitude_importance(model, [structure])[structure.name],
                               host.base_layer.weight.abs().sum(1))


class GatedMLP(nn.Module):
    """A LLaMA-style MLP block (residual): channels of ``gate_proj`` / ``up_proj`` rows and ``down_proj`` columns."""

    def __init__(self, d: int = 8, hidden: int = 20) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden), nn.Linear(d, hidden)
        self.down_proj = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_schedule_reaches_the_target_and_never_touches_the_base_gradient(sparsity: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(GatedMLP(), GatedMLP())
    lorakit.adapt(model, lorakit.LoraConfig(r=2, init="random", targets=["gate_proj", "up_proj", "down_proj"]))
    structures = find_structures(model)
    assert [(s.name, s.kind, s.groups) for s in structures] == [("0", "mlp", 20), ("1", "mlp", 20)]
    hook = LoraPrune("default", structures, sparsity, interval=2, rounds=3, beta=0.5)
    hooks = HookList([hook])
    optimizer = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=1e-2)
    x = torch.randn(16, 8)
    seen = []
    for step in range(8):
        hooks.before_forward(model, step)
        model(x).pow(2).mean().backward()
        hooks.before_step(model, optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
        hooks.after_step(model, optimizer, step + 1)
        seen.append([int((~m).sum()) for m in hook.masks.values()])
    expected = [math.floor(sparsity * 20 * k / 3 + 0.5) for k in (1, 2, 3, 3)]
    assert [seen[i][0] for i in (1, 3, 5, 7)] == expected and expected[-1] == sparsity * 20  # exactly the target
    assert all(seen[i] == seen[i - 1] for i in (2, 4, 6))  # prunes only every `interval` steps
    assert hook.metrics()["loraprune/sparsity"] == sparsity
    for name, p in model.named_parameters():
        assert "adapters" in name or (p.grad is None and not p.requires_grad), name
    # masked rows stay zero in the base and in B although AdamW moved them
    up, drop = model[0].up_proj, ~hook.masks["0"]
    assert bool((up.base_layer.weight[drop] == 0).all() and (up.base_layer.bias[drop] == 0).all())
    assert bool((up.adapters["default"].b[drop] == 0).all())
    # state round trip
    fresh = LoraPrune("default", structures, sparsity, interval=2, rounds=3, beta=0.5)
    fresh.load_state_dict(copy.deepcopy(hook.state_dict()), model)
    assert all(torch.equal(fresh.masks[k], hook.masks[k]) for k in hook.masks)
    assert all(torch.equal(fresh.importance[k], hook.importance[k]) for k in hook.importance)


def test_pruned_channels_output_zero_merge_and_shrink() -> None:
    model = adapted()
    structures = find_structures(model)
    loss_of(model).backward()
    importance = lora_importance(model, "default", structures)
    masks = prune_masks(importance, 0.5)
    for key, keep in masks.items():  # the half of lowest importance goes
        assert int((~keep).sum()) == keep.numel() // 2 and importance[key][~keep].max() < importance[key][keep].min()
    apply_masks(model, structures, masks)

    outputs = {}
    handles = [model.get_submodule(f"model.layers.{i}.mlp.{p}").register_forward_hook(
        lambda mod, inp, out, key=(i, p): outputs.__setitem__(key, out))
        for i in (0, 1) for p in ("gate_proj", "up_proj")]
    with torch.no_grad():
        unmerged = model(IDS).logits
    for h in handles:
        h.remove()
    for (i, _), out in outputs.items():
        drop = ~masks[f"model.layers.{i}.mlp"]
        assert bool((out[..., drop] == 0).all()) and bool((out[..., ~drop] != 0).any())
    assert bool(torch.isfinite(unmerged).all())

    lorakit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    down = model.get_submodule("model.layers.1.mlp.down_proj").base_layer.weight
    assert bool((down[:, ~masks["model.layers.1.mlp"]] == 0).all())  # merged columns stay zero

    lorakit.unload(model, merge_active=True)
    apply_masks(model, structures, masks, shrink=True)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (32, 32)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_clear_errors() -> None:
    model = adapted()
    structures = find_structures(model, heads=False)
    with pytest.raises(ConfigError, match="no gradients"):
        lora_importance(model, "default", structures)
    with pytest.raises(ConfigError, match="has no adapter 'other'"):
        magnitude_importance(model, structures, "other")
    with pytest.raises(ConfigError, match="sparsity"):
        LoraPrune("default", structures, 1.0)
    with pytest.raises(ConfigError, match="plain Linear to shrink"):
        apply_masks(model, structures, {s.name: torch.ones(s.groups, dtype=torch.bool) for s in structures},
                    shrink=True)
