"""Catalogue methods, part B (METHODS.md section A: Compacter, MoS, S2-LoRA, LaMDA, SaRA, MoSA): each one's defining
property and its trainable-parameter formula, against dense reference computations written out here."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from zoo import Net, net, perturb, tiny_llama

import lorakit
from lorakit.hosts.host import HostLayer
from lorakit.io.adapter_files import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, file_digest
from lorakit.io.files import read_json, read_safetensors, write_json, write_safetensors
from lorakit.methods.compacter import CompacterConfig
from lorakit.methods.lamda import LamdaConfig, lamda_freeze
from lorakit.methods.mos import MosConfig
from lorakit.methods.mosa import MosaConfig, mosa_resample
from lorakit.methods.s2lora import S2LoraConfig, s2lora_prox
from lorakit.methods.sara import SaraConfig, sara_nuclear_norm


def adapted(layer: nn.Module, config):
    torch.manual_seed(0)
    model = lorakit.adapt(Net(layer), config.replace(targets=["layer"]))
    perturb(model)
    host = model.layer
    return model, host, host.adapters["default"]


def n_trainable(model) -> int:
    return sum(p.numel() for p in lorakit.trainable_parameters(model).values())


def linears(model: nn.Module, name: str = "default") -> list[tuple[HostLayer, nn.Module]]:
    """(host layer, adapter) of every adapted layer."""
    return [(h, h.adapters[name]) for h in lorakit.inject.hosts(model) if name in h.adapters]


# -- Compacter ------------------------------------------------------------------------------------------------------
def phm_reference(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i kron (s_i t_i^T)`` with explicit ``torch.kron``."""
    return sum(torch.kron(rule[i], torch.outer(s[i], t[i])) for i in range(rule.shape[0]))


@pytest.mark.parametrize("n", [2, 4])
def test_compacter_matvec_without_kronecker_products_matches_torch_kron(n):
    """The parallel form's ``U D x`` (the paper form's ``U GeLU(D y)``: test_compacter_paper.py)."""
    model, host, c = adapted(nn.Linear(24, 16), CompacterConfig(r=8, n=n, form="parallel"))
    rule = c.shared.phm_rule.detach()
    down = phm_reference(rule, c.phm_down_s.detach(), c.phm_down_t.detach())  # (8, 24)
    up = phm_reference(rule, c.phm_up_s.detach(), c.phm_up_t.detach())  # (16, 8)
    assert down.shape == (8, 24) and up.shape == (16, 8)
    torch.testing.assert_close(c.delta_weight(host.backend), up @ down)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(model(x), host.base_layer(x) + x @ (up @ down).t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", CompacterConfig.FORMS)
def test_compacter_rules_are_one_shared_tensor_and_the_count_follows_the_formula(form):
    n, k = 4, 8
    model = lorakit.adapt(tiny_llama(), CompacterConfig(r=k, n=n, form=form))
    layers = linears(model)
    rule = lorakit.inject.shared_states(model)["default"].phm_rule
    assert all(a.shared.phm_rule is rule for _, a in layers)
    assert any(a.geometry.d_in != a.geometry.d_out for _, a in layers)  # the down projection's input tells forms apart

    def d_down(a) -> int:  # what D reads: the layer's output (paper) or its input (parallel)
        return a.geometry.d_out if form == "paper" else a.geometry.d_in

    per_layer = sum(n * (k // n + d_down(a) // n) + n * (a.geometry.d_out // n + k // n) for _, a in layers)
    assert n_trainable(model) == n ** 3 + per_layer
    perturb(model)
    inputs = {h.path: torch.randn(2, a.geometry.d_in) for h, a in layers}

    def contributions() -> list[torch.Tensor]:
        with torch.no_grad():
            return [a(inputs[h.path], h.base_layer(inputs[h.path]), h.backend) for h, a in layers]

    before = contributions()
    with torch.no_grad():
        rule.add_(1.0)  # one update of the slow weights changes every layer's update
    assert all(not torch.allclose(c, b) for c, b in zip(contributions(), before))


@pytest.mark.parametrize("form", CompacterConfig.FORMS)
def test_compacter_rejects_n_that_does_not_divide_the_layer(form):
    with pytest.raises(lorakit.ConfigError, match="r=6 is invalid: must be a positive multiple of n=4"):
        CompacterConfig(r=6, n=4, form=form)
    with pytest.raises(lorakit.ConfigError, match="n=4 is invalid: must divide .* d_out=10"):
        lorakit.adapt(Net(nn.Linear(12, 10)), CompacterConfig(n=4, form=form, targets=["layer"]))
    narrow_input = Net(nn.Linear(10, 12))
    if form == "parallel":  # D reads the layer's input
        with pytest.raises(lorakit.ConfigError, match="n=4 is invalid: must divide .* d_in=10"):
            lorakit.adapt(narrow_input, CompacterConfig(n=4, form=form, targets=["layer"]))
    else:  # D reads the layer's output: its input size does not matter
        lorakit.adapt(narrow_input, CompacterConfig(n=4, form=form, targets=["layer"]))
        perturb(narrow_input)
        x = torch.randn(3, 10)
        assert (narrow_input(x) - narrow_input.layer.base_layer(x)).abs().max() > 1e-3


# -- state shared by all layers: stored once, saved once, loaded back ------------------------------------------------
@pytest.mark.parametrize("config,shared_keys", [
    (CompacterConfig(r=8, n=4), ["phm_rule"]),
    (CompacterConfig(r=8, n=4, form="parallel"), ["phm_rule"]),
    (S2LoraConfig(r=4), [f"s2lora_{m}.{g}" for m in "AB" for g in ("16x32", "32x32", "32x64", "64x32")]),
    (MosConfig(r=4, pool_size=8), [f"pools.{p}" for p in ("A16", "A32", "B16", "B32", "B8")]),
])
def test_shared_state_is_saved_once_and_loads_back(config, shared_keys, tmp_path):
    model = lorakit.adapt(tiny_llama(), config)
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    keys = [k for k in load_file(tmp_path / WEIGHTS_FILE) if k.startswith("lorakit_shared.")]
    assert sorted(keys) == sorted(f"lorakit_shared.{k}" for k in shared_keys)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    ids = torch.randint(0, 96, (2, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# -- S2-LoRA --------------------------------------------------------------------------------------------------------
def test_s2lora_update_is_shared_b_diag_lambda_a_and_the_count_follows_the_formula():
    r = 4
    model = lorakit.adapt(tiny_llama(), S2LoraConfig(r=r, alpha=8))
    perturb(model)
    layers = linears(model)
    groups = {(a.geometry.d_out, a.geometry.d_in) for _, a in layers}
    assert n_trainable(model) == sum(r * (d_in + d_out) for d_out, d_in in groups) + len(layers) * r
    shared = lorakit.inject.shared_states(model)["default"]
    for h, a in layers:
        key = f"{a.geometry.d_out}x{a.geometry.d_in}"
        big_a, big_b = shared.s2lora_A[key].detach(), shared.s2lora_B[key].detach()
        expected = big_b @ torch.diag(a.s2lora_lambda.detach()) @ big_a * (8 / r)
        torch.testing.assert_close(a.delta_weight(h.backend), expected)
    q = [a for h, a in layers if h.path.endswith("q_proj")]
    assert q[0].pair()[0] is q[1].pair()[0]  # same shape group: the very same tensor


def test_s2lora_zero_coefficients_give_the_base_output_of_that_layer():
    model, host, adapter = adapted(nn.Linear(12, 10), S2LoraConfig(r=4))
    x = torch.randn(3, 12)
    assert not torch.allclose(model(x), host.base_layer(x))
    with torch.no_grad():
        adapter.s2lora_lambda.zero_()
    assert torch.equal(model(x), host.base_layer(x))


def test_s2lora_proximal_l1_step_gives_exact_zeros():
    model, _, adapter = adapted(nn.Linear(12, 10), S2LoraConfig(r=6))
    with torch.no_grad():
        adapter.s2lora_lambda.copy_(torch.tensor([0.5, -0.05, 0.1, -0.3, 0.02, 0.09]))
    zeros = s2lora_prox(model, 0.1)
    assert zeros == 4
    expected = torch.tensor([0.4, 0.0, 0.0, -0.2, 0.0, 0.0])
    assert torch.equal(adapter.s2lora_lambda.detach() == 0, expected == 0)
    torch.testing.assert_close(adapter.s2lora_lambda.detach(), expected)


# -- MoS ------------------------------------------------------------------------------------------------------------
def test_mos_trainable_count_is_the_pool_size_whatever_the_number_of_layers():
    config = MosConfig(r=4, shards=2, pool_size=8)
    counts = []
    for targets in (["q_proj"], ["q_proj", "o_proj"]):  # 2 or 4 layers of shape 32 x 32
        model = lorakit.adapt(tiny_llama(), config.replace(targets=targets))
        counts.append(n_trainable(model))
    assert counts == [8 * 16 + 8 * 16] * 2  # pool_A16 and pool_B16, each 8 pieces of 16


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_mos_assembles_factors_from_pool_pieces_and_sums_shared_gradients():
    torch.manual_seed(0)
    model = TwoLayers()
    lorakit.adapt(model, MosConfig(r=4, shards=3, pool_size=6, private_rank=1, targets=["first", "second"]))
    perturb(model)
    pools = lorakit.inject.shared_states(model)["default"].pools
    layers = [model.first, model.second]
    adapters = [layer.adapters["default"] for layer in layers]
    x = torch.randn(5, 12)
    leaves = []
    for ad in adapters:  # reference assembly, rank vector by rank vector
        a_rows = [ad.mos_private_A[0]] + [torch.cat([pools["A4"][i] for i in ad.mos_index_A[j]]) for j in range(3)]
        b_cols = [ad.mos_private_B[:, 0]] + [torch.cat([pools["B4"][i] for i in ad.mos_index_B[j]]) for j in range(3)]
        a, b = torch.stack(a_rows).detach(), torch.stack(b_cols, dim=1).detach()
        assert a.shape == (4, 12) and b.shape == (12, 4)
        leaves.append((a.requires_grad_(), b.requires_grad_()))
    h = x
    for layer, (a, b) in zip(layers, leaves):
        h = layer.base_layer(h) + F.linear(F.linear(h, a), b) * (8 / 4)
    torch.testing.assert_close(model(x), h)
    model(x).square().sum().backward()
    h.square().sum().backward()
    expected_a, expected_b = torch.zeros_like(pools["A4"]), torch.zeros_like(pools["B4"])
    for ad, (a, b) in zip(adapters, leaves):  # the gradient of a piece sums over every position it fills
        for j in range(3):
            for s, i in enumerate(ad.mos_index_A[j]):
                expected_a[i] += a.grad[1 + j, 4 * s : 4 * s + 4]
            for s, i in enumerate(ad.mos_index_B[j]):
                expected_b[i] += b.grad[4 * s : 4 * s + 4, 1 + j]
    torch.testing.assert_close(pools["A4"].grad, expected_a)
    torch.testing.assert_close(pools["B4"].grad, expected_b)
    assert int(pools["A4"].grad.abs().sum(1).gt(0).sum()) == 6  # every piece of the pool is used


def test_mos_with_only_private_shards_is_lora():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    mos_model, host, mos = adapted(layer_copy(base), MosConfig(r=4, private_rank=4, alpha=6))
    assert not lorakit.inject.shared_states(mos_model)["default"].pools  # no sharing: no pool at all
    assert n_trainable(mos_model) == 4 * (12 + 10)
    lora_model, _, lora = adapted(layer_copy(base), lorakit.LoraConfig(r=4, alpha=6))
    with torch.no_grad():
        lora.lora_A.weight.copy_(mos.mos_private_A)
        lora.lora_B.weight.copy_(mos.mos_private_B)
    x = torch.randn(3, 12)
    torch.testing.assert_close(mos_model(x), lora_model(x))


def test_mos_rejects_pools_larger_than_their_slots():
    with pytest.raises(lorakit.ConfigError, match="pool_size=64 is invalid: pool 'A6' has only 16 slots"):
        lorakit.adapt(Net(nn.Linear(12, 10)), MosConfig(r=8, pool_size=64, targets=["layer"]))
    with pytest.raises(lorakit.ConfigError, match="shards=4 is invalid: must divide .* d_out=10"):
        lorakit.adapt(Net(nn.Linear(12, 10)), MosConfig(shards=4, targets=["layer"]))


# -- LaMDA / LaMDA++ ------------------------------------------------------------------------------------------------
def test_lamda_starts_from_the_spectrum_and_freezing_b_leaves_r_squared_and_frees_its_optimizer_state():
    r = 4
    model = lorakit.adapt(tiny_llama(), LamdaConfig(r=r, freeze_b_step=2, targets=["q_proj", "o_proj"]))
    layers = linears(model)
    a0 = layers[0][1]
    w = a0.geometry  # A = V_r^T of W0: orthonormal rows
    torch.testing.assert_close(a0.lora_A @ a0.lora_A.t(), torch.eye(r), atol=1e-5, rtol=0)
    assert a0.lora_A.shape == (r, w.d_in) and not a0.lora_A.requires_grad
    assert n_trainable(model) == sum(r * r + a.geometry.d_out * r for _, a in layers)
    opt = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=1e-2)
    ids = torch.randint(0, 96, (2, 8))
    for step in range(3):
        assert lamda_freeze(model, step, opt) == (len(layers) if step == 2 else 0)
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert n_trainable(model) == len(layers) * r * r
    bs = {id(a.lora_B) for _, a in layers}
    optimised = [p for g in opt.param_groups for p in g["params"]]
    assert not any(id(p) in bs for p in optimised) and not any(id(p) in bs for p in opt.state)
    assert all(not a.lora_B.requires_grad and a.lora_B.grad is None for _, a in layers)


def keep_into(store: list[torch.Tensor]):
    def pack(t: torch.Tensor) -> torch.Tensor:
        store.append(t)
        return t
    return pack


def test_lamda_backward_keeps_r_dim_activations_not_the_input():
    n, d_in, r = 64, 256, 4
    saved: list[torch.Tensor] = []
    x = torch.randn(n, d_in, requires_grad=True)
    for config in (LamdaConfig(r=r), lorakit.LoraConfig(r=r)):
        _, host, adapter = adapted(nn.Linear(d_in, 128), config)
        params = {p.untyped_storage().data_ptr() for p in adapter.parameters()}
        activations: list[torch.Tensor] = []
        base_out = host.base_layer(x)
        with torch.autograd.graph.saved_tensors_hooks(keep_into(activations), lambda t: t):
            adapter(x, base_out, host.backend).sum().backward()
        saved.append(sum(t.numel() for t in activations if t.untyped_storage().data_ptr() not in params))
    lamda_saved, lora_saved = saved
    assert lamda_saved <= 2 * n * r  # A x and S A x
    assert lora_saved >= n * d_in  # LoRA keeps x for A's gradient


def test_lamda_plus_plus_rank_follows_the_normalised_spectrum_energy():
    u, _ = torch.linalg.qr(torch.randn(10, 10))
    v, _ = torch.linalg.qr(torch.randn(8, 8))
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.1, 0.1, 0.1])  # energy shares: .72 .90 .94 .99 ...
    layer = nn.Linear(8, 10)
    with torch.no_grad():
        layer.weight.copy_(u[:, :8] @ torch.diag(sigma) @ v.t())
    for energy, rank in [(0.6, 1), (0.9, 3), (0.95, 4), (1.0, 6)]:  # 6: capped by r
        model = lorakit.adapt(Net(layer_copy(layer)), LamdaConfig(r=6, energy=energy, targets=["layer"]))
        assert model.layer.adapters["default"].r == rank, energy


def layer_copy(layer: nn.Linear) -> nn.Linear:
    new = nn.Linear(layer.in_features, layer.out_features)
    new.load_state_dict(layer.state_dict())
    return new


# -- SaRA -----------------------------------------------------------------------------------------------------------
def test_sara_trains_exactly_the_smallest_weights_and_nothing_else():
    layer = nn.Linear(20, 16)
    w0 = layer.weight.detach().clone()
    model = lorakit.adapt(Net(layer), SaraConfig(fraction=0.15, targets=["layer"]))
    nnz = round(0.15 * w0.numel())
    assert n_trainable(model) == nnz  # gradients and optimizer state hold nnz numbers, not |W0|
    threshold = w0.abs().flatten().sort().values[nnz - 1]
    mask = w0.abs() <= threshold
    assert int(mask.sum()) == nnz
    opt = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=0.1)
    model(torch.randn(4, 20)).square().sum().backward()
    assert lorakit.trainable_parameters(model)["layer.adapters.default.sara_values"].grad.shape == (nnz,)
    opt.step()
    lorakit.merge(model)
    w1 = model.layer.base_layer.weight.detach()
    assert torch.equal(w1[~mask], w0[~mask])  # bit-identical outside the mask
    assert bool((w1[mask] != w0[mask]).all())


def test_sara_nuclear_norm_subgradient_is_u_v_transpose_on_the_mask():
    model, host, sara = adapted(nn.Linear(12, 10), SaraConfig(fraction=0.5))
    delta = sara.delta_weight(host.backend)
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    sara_nuclear_norm(model).backward()
    rows, cols = sara.sara_index // 12, sara.sara_index % 12
    torch.testing.assert_close(sara.sara_values.grad, (u @ vh)[rows, cols], atol=1e-5, rtol=1e-4)


def test_sara_on_conv2d_is_the_masked_kernel_and_the_fused_linear_matches():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    model, host, sara = adapted(conv, SaraConfig(fraction=0.2))
    kernel = torch.zeros(4 * 3 * 3 * 3)
    kernel[sara.sara_index] = sara.sara_values.detach()
    x = torch.randn(2, 3, 8, 8)
    expected = host.base_layer(x) + F.conv2d(x, kernel.view(4, 3, 3, 3), stride=2, padding=1)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model, host, sara = adapted(nn.Linear(12, 10), SaraConfig())
    x = torch.randn(3, 12)
    fused = model(x)  # one product (W0 + dW) x
    torch.testing.assert_close(fused, host.base_layer(x) + sara(x, host.base_layer(x), host.backend))


# -- MoSA -----------------------------------------------------------------------------------------------------------
def test_mosa_modules_partition_the_adapter_and_only_sampled_ones_get_gradients():
    """The parallel form's ``A``, ``B`` (the paper form's bottleneck: test_mosa_paper.py)."""
    model, host, mosa = adapted(nn.Linear(12, 10), MosaConfig(r=4, modules=4, form="parallel"))
    assert n_trainable(model) == 4 * (12 + 10)  # the standard adapter's count: splitting adds nothing
    for part, t in ((mosa.mosa_module_A, mosa.lora_A.weight), (mosa.mosa_module_B, mosa.lora_B.weight)):
        assert part.shape == t.shape and torch.bincount(part.flatten(), minlength=4).tolist() == [t.numel() // 4] * 4
    model.train()
    mosa_resample(model, k=1, generator=torch.Generator().manual_seed(3))
    a_mask, b_mask = mosa._masks
    x = torch.randn(3, 12)
    a, b = mosa.lora_A.weight.detach(), mosa.lora_B.weight.detach()
    expected = host.base_layer(x) + F.linear(F.linear(x, a * a_mask), b * b_mask) * mosa.scale
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    sampled = int(mosa.mosa_module_A[a_mask][0])
    assert bool((a_mask == (mosa.mosa_module_A == sampled)).all())
    assert bool((mosa.lora_A.weight.grad[~a_mask] == 0).all()) and bool(mosa.lora_A.weight.grad[a_mask].ne(0).all())
    assert bool((mosa.lora_B.weight.grad[~b_mask] == 0).all()) and bool(mosa.lora_B.weight.grad[b_mask].ne(0).all())


def test_mosa_merged_and_eval_adapter_is_the_complete_one_at_lora_cost():
    model, host, mosa = adapted(nn.Linear(12, 10), MosaConfig(r=4, modules=3, form="parallel"))
    model.train()
    mosa_resample(model, k=1)
    a, b = mosa.lora_A.weight.detach(), mosa.lora_B.weight.detach()
    complete = b @ a * mosa.scale  # the sum of every module's entries is the full A, B
    torch.testing.assert_close(mosa.delta_weight(host.backend), complete)
    model.eval()
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), host.base_layer(x) + x @ complete.t())
    lora_model, _, _ = adapted(nn.Linear(12, 10), lorakit.LoraConfig(r=4))
    lora_model.eval()
    flops = []
    for m in (model, lora_model):
        with FlopCounterMode(display=False) as counter:
            m(x)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1]


# -- exact low-rank factors (stacked serving path, LoRA export); Compacter's and MoSA's mergeable (parallel) forms ----
@pytest.mark.parametrize("config", [CompacterConfig(r=4, form="parallel"), S2LoraConfig(r=4), LamdaConfig(r=4),
                                    MosaConfig(r=4, form="parallel"), MosConfig(r=4, private_rank=1, pool_size=6)],
                         ids=lambda c: c.method)
def test_factors_are_exact_and_of_rank_r(config):
    model, host, adapter = adapted(nn.Linear(12, 10), config)
    assert adapter.capabilities.factorable
    b, a = adapter.factors()
    assert b.shape == (10, 4) and a.shape == (4, 12)
    torch.testing.assert_close(b @ a, adapter.delta_weight(host.backend))
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), host.base_layer(x) + x @ a.t() @ b.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [CompacterConfig(r=8, n=4, form="parallel"), S2LoraConfig(r=4),
                                    MosConfig(r=4, pool_size=8)], ids=lambda c: c.method)
def test_shared_state_methods_export_as_a_plain_lora(config, tmp_path):
    model = lorakit.adapt(tiny_llama(), config)
    perturb(model)
    lorakit.export_lora(model, tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert type(lorakit.configs(loaded)["default"]) is lorakit.LoraConfig
    ids = torch.randint(0, 96, (2, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["linear", "gpt2_conv1d"])
def test_compacter_parallel_form_exports_as_a_plain_lora_on_each_linear_layer_type(layer, tmp_path):
    """The stock layer with the exported LoRA computes what the parallel Compacter did (a transposed GPT-2 Conv1D
    too); the paper form refuses export (test_compacter_paper.py)."""
    model, x = net(layer)
    stock = copy.deepcopy(model)
    lorakit.adapt(model, CompacterConfig(r=4, form="parallel", targets=["layer"]))
    perturb(model)
    lorakit.export_lora(model, tmp_path)
    lorakit.load_adapter(stock, tmp_path)
    assert type(lorakit.configs(stock)["default"]) is lorakit.LoraConfig
    torch.testing.assert_close(stock(x), model(x), atol=1e-5, rtol=1e-5)


# -- adapter files written before Compacter's and MoSA's ``form`` field existed ---------------------------------------
def drop_saved_field(directory: Path, field: str) -> None:
    """Make a saved adapter what a lorakit without config field ``field`` wrote: the field gone from both configs
    (the weights' metadata and the JSON), the manifest matching the rewritten files."""
    tensors, metadata = read_safetensors(directory / WEIGHTS_FILE)
    config = json.loads(metadata["lorakit_config"])
    del config[field]
    write_safetensors(directory / WEIGHTS_FILE, tensors, {**metadata, "lorakit_config": json.dumps(config)})
    peft = read_json(directory / CONFIG_FILE)
    del peft[field]
    write_json(directory / CONFIG_FILE, peft)
    write_json(directory / MANIFEST_FILE, {"files": {f: file_digest(directory / f) for f in (WEIGHTS_FILE,
                                                                                              CONFIG_FILE)}})


@pytest.mark.parametrize("config", [CompacterConfig(r=4, n=4, form="parallel"), MosaConfig(r=4, form="parallel")],
                         ids=lambda c: c.method)
def test_a_file_without_form_loads_as_the_parallel_form_it_was_trained_as(config, tmp_path):
    """Before ``form`` existed both methods were their parallel form; today's default is the paper's, so a file that
    omits the field must not take it. A square layer: Compacter's two forms would even have tensors of equal shapes."""
    model, host, _ = adapted(nn.Linear(16, 16), config)
    stock = Net(copy.deepcopy(host.base_layer))
    lorakit.save_adapter(model, tmp_path)
    drop_saved_field(tmp_path, "form")
    assert "form" not in json.loads(read_safetensors(tmp_path / WEIGHTS_FILE)[1]["lorakit_config"])
    loaded = lorakit.load_adapter(stock, tmp_path)
    assert lorakit.configs(loaded)["default"] == lorakit.configs(model)["default"]  # form="parallel"
    assert loaded.layer.adapters["default"].capabilities.mergeable
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), model(x))
