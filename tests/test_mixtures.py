"""Mixtures of LoRA experts: routers and their losses, FFN-level expert blocks (MixLoRA / LLaVA-MoLE / MoLA), SMoRA's
rank experts. Each test checks a property from METHODS.md section F against a reference computed another way."""
from __future__ import annotations

import pytest
import torch
from zoo import tiny_llama

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.hooks import HookList
from lorakit.hosts.host import adapters_named, hosts
from lorakit.mixtures.block import ExpertBlock, add_expert_blocks, expert_names
from lorakit.mixtures.hooks import RouterLosses
from lorakit.routing.routers import GateRouter, switch_balance, top_k

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
FFN = ["gate_proj", "up_proj", "down_proj"]


def randomize(params, std: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def moe(experts=4, k=2, seed=0, **options):
    model = tiny_llama(seed)
    router = add_expert_blocks(model, "moe", lorakit.LoraConfig(r=2, targets=FFN), experts, top_k=k, **options)
    randomize(lorakit.trainable_parameters(model).values(), seed=seed)
    return model, router


def set_dispatch(model, dispatch: str) -> None:
    for block in model.modules():
        if isinstance(block, ExpertBlock):
            block.dispatch = dispatch


# -- routers ----------------------------------------------------------------------------------------------------------
def test_switch_balance_is_one_under_uniform_routing_and_grows_with_imbalance():
    n, e = 64, 4
    uniform = torch.full((n, e), 1 / e)
    balanced = torch.zeros(n, e).scatter(1, (torch.arange(n) % e).unsqueeze(1), 1.0)
    assert switch_balance(uniform, balanced).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(n, e)
    all_first = torch.zeros(n, e).index_fill(1, torch.tensor([0]), 1.0)
    assert switch_balance(skewed_probs, all_first).item() == pytest.approx(e * 0.7)


def test_top_k_keeps_exactly_k_weights_summing_to_one():
    probs = torch.softmax(torch.randn(10, 6, generator=torch.Generator().manual_seed(1)), -1)
    kept = top_k(probs, 2)
    assert ((kept != 0).sum(-1) == 2).all()
    torch.testing.assert_close(kept.sum(-1), torch.ones(10))
    assert torch.equal(kept.argmax(-1), probs.argmax(-1))


def test_hard_router_forwards_one_hot_and_trains_through_the_soft_weights():
    router = GateRouter(4, {"l": 8}, hard=True)
    randomize(router.parameters(), std=1.0)
    x = torch.randn(5, 8)
    w = router("l", x)
    assert set(w.unique().tolist()) <= {0.0, 1.0} and torch.equal(w.sum(-1), torch.ones(5))
    (w * torch.arange(4.0)).sum().backward()
    assert router.gates["l"].weight.grad.abs().sum() > 0


def test_noisy_router_adds_noise_only_while_training():
    router = GateRouter(4, {"l": 8}, top_k=2, noisy=True)
    x = torch.randn(6, 8)
    router.eval()
    assert torch.equal(router("l", x), router("l", x))
    router.train()
    torch.manual_seed(0)
    assert not torch.equal(router("l", x), router("l", x))


def test_router_options_are_checked():
    with pytest.raises(ConfigError, match="top_k"):
        GateRouter(4, {"a": 8, "b": 8}, top_k=3, experts={"a": 4, "b": 2})
    with pytest.raises(ConfigError, match="experts"):
        GateRouter(4, {"a": 8}, experts={"a": 5})
    with pytest.raises(LorakitError, match="no gate for layer"):
        GateRouter(2, {"a": 8})("b", torch.randn(1, 8))


# -- FFN-level expert blocks: MixLoRA, LLaVA-MoLE, MoLA ----------------------------------------------------------------
def test_one_expert_top_one_is_plain_lora_on_the_ffn():
    model, _ = moe(experts=1, k=1)
    plain = tiny_llama(0)
    lorakit.adapt(plain, lorakit.LoraConfig(r=2, targets=FFN))
    mine = lorakit.trainable_parameters(model, "moe_0")
    theirs = lorakit.trainable_parameters(plain)
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(mine[key.replace("adapters.default", "adapters.moe_0")])  # host paths are the stock model's
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=1e-5)


def test_sparse_dispatch_equals_the_dense_reference_in_outputs_and_gradients():
    model, router = moe(experts=4, k=2)
    randomize(router.parameters(), std=1.0, seed=3)
    params = lorakit.trainable_parameters(model)
    results = {}
    for dispatch in ("sparse", "dense"):
        set_dispatch(model, dispatch)
        for p in params.values():
            p.grad = None
        logits = model(IDS).logits
        logits.square().mean().backward()
        results[dispatch] = (logits.detach(), {k: p.grad.clone() for k, p in params.items() if p.grad is not None})
    torch.testing.assert_close(results["sparse"][0], results["dense"][0], atol=1e-5, rtol=1e-5)
    assert results["sparse"][1].keys() == results["dense"][1].keys() and any("lorakit_routers" in k
                                                                            for k in results["sparse"][1])
    for key, grad in results["dense"][1].items():
        torch.testing.assert_close(results["sparse"][1][key], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_ffn_rows_scale_with_k_not_with_the_number_of_experts(k):
    model, router = moe(experts=4, k=k)
    randomize(router.parameters(), std=1.0, seed=3)
    rows = []
    model.model.layers[0].mlp.block.up_proj.register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        model(IDS)
        sparse_rows = sum(rows)
        rows.clear()
        set_dispatch(model, "dense")
        model(IDS)
    assert sparse_rows == k * IDS.numel()  # LLaVA-MoLE (k = 1): one LoRA FFN per token, as plain LoRA
    assert sum(rows) == 4 * IDS.numel()


def test_mola_per_layer_expert_counts():
    counts = {"model.layers.0.mlp": 2, "model.layers.1.mlp": 4}  # more experts in the higher layer
    model, router = moe(experts=counts, k=2)
    for path, n in counts.items():
        assert router.gates[path.replace(".", "-")].out_features == n
    r, d, ff = 2, 32, 64
    per_expert = r * ((d + ff) + (d + ff) + (ff + d))  # gate, up, down projections
    adapters = {k: p for k, p in lorakit.trainable_parameters(model).items() if "lorakit_routers" not in k}
    assert sum(p.numel() for p in adapters.values()) == sum(counts.values()) * per_expert
    assert "moe_3" not in model.model.layers[0].mlp.block.up_proj.adapters
    randomize(router.parameters(), std=1.0, seed=3)
    model.train()
    model(IDS)
    assert router.loads["model.layers.0.mlp"].shape == (2,)  # never routes to an expert the layer lacks


def test_router_losses_reach_the_router_and_are_logged():
    model, router = moe(experts=4, k=2, balance=0.5, z_loss=0.1)
    hooks = HookList([RouterLosses()])
    model.eval()
    model(IDS)
    assert hooks.forward_loss(model) is None  # nothing recorded outside training
    model.train()
    model(IDS)
    extra = hooks.forward_loss(model)
    assert extra is not None and extra.item() >= 0.5  # the balance term is >= its coefficient
    assert hooks.forward_loss(model) is None  # taken once
    extra.backward()
    assert all(router.gates[k].weight.grad.abs().sum() > 0 for k in router.gates)
    stats = hooks.metrics()
    loads = [v for k, v in stats.items() if k.startswith("router/moe/load_")]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0) and "router/moe/entropy" in stats


def test_blocks_refuse_bad_requests():
    model = tiny_llama(0)
    with pytest.raises(LorakitError, match="no module of this model is named 'ffn'"):
        add_expert_blocks(model, "moe", lorakit.LoraConfig(r=2, targets=FFN), 4, blocks="ffn")
    with pytest.raises(LorakitError, match="none of the targets"):
        add_expert_blocks(model, "moe", lorakit.LoraConfig(r=2, targets=["q_proj"]), 4)
    assert expert_names("moe", 2) == ["moe_0", "moe_1"]


# -- SMoRA ------------------------------------------------------------------------------------------------------------
def smora_model(top_k=2, block=2, r=8):
    model = tiny_llama(0)
    lorakit.adapt(model, lorakit.SmoraConfig(r=r, alpha=r, targets=["q_proj", "down_proj"], top_k=top_k,
                                             block=block), "s")
    randomize(lorakit.trainable_parameters(model, "s").values(), seed=1)
    return model


def test_smora_equals_a_mixture_of_lora_experts_cut_from_the_same_factors():
    """The paper's equivalence: E = r / block rank-block LoRAs routed by m(x) == one rank-r LoRA with block gating."""
    model = smora_model(top_k=2, block=2, r=8)
    with torch.no_grad():
        reference = model(IDS).logits
    names = [f"e{i}" for i in range(4)]
    for name in names:
        lorakit.adapt(model, lorakit.LoraConfig(r=2, alpha=2, targets=["q_proj", "down_proj"]), name)
    gates = {}
    with torch.no_grad():
        for host in hosts(model):
            smora = host.adapters["s"]
            gates[host.path] = smora
            for i, name in enumerate(names):
                host.adapters[name].lora_A.weight.copy_(smora.lora_A.weight[2 * i:2 * i + 2])
                host.adapters[name].lora_B.weight.copy_(smora.lora_B.weight[:, 2 * i:2 * i + 2])
        with lorakit.mix(model, names, lambda path, x: gates[path].expert_weights(x)):
            mixed = model(IDS).logits
    torch.testing.assert_close(mixed, reference, atol=1e-5, rtol=1e-5)


def test_smora_with_every_expert_active_at_init_is_plain_lora():
    model = smora_model(top_k=4, block=2, r=8)
    for _, adapter in adapters_named(model, "s"):
        torch.nn.init.zeros_(adapter.gate.weight)
    plain = tiny_llama(0)
    lorakit.adapt(plain, lorakit.LoraConfig(r=8, alpha=8, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for (_, a), (_, b) in zip(adapters_named(model, "s"), adapters_named(plain,
                                                                                                        "default")):
            b.lora_A.weight.copy_(a.lora_A.weight)
            b.lora_B.weight.copy_(a.lora_B.weight)
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=1e-5)


def test_smora_activates_exactly_k_experts_per_token_and_balances_its_load():
    model = smora_model(top_k=1, block=1, r=4)
    adapter = model.model.layers[0].self_attn.q_proj.adapters["s"]
    x = torch.randn(3, 5, 32)
    assert ((adapter.expert_weights(x) != 0).sum(-1) == 1).all()
    model.train()
    hooks = HookList(lorakit.hooks.training_hooks(lorakit.configs(model)["s"], "s", 10))
    model(IDS)
    load = adapter.load.clone()
    hooks.after_step(model, None, 1)
    moved = adapter.balance_bias
    assert torch.equal(torch.sign(moved), torch.sign(load.mean() - load))  # under-used experts gain


def test_smora_config_is_checked():
    with pytest.raises(ConfigError, match="block"):
        lorakit.SmoraConfig(r=8, block=3)
    with pytest.raises(ConfigError, match="top_k"):
        lorakit.SmoraConfig(r=8, block=2, top_k=5)
