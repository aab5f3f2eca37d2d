"""Adapter composition on a tiny diffusion UNet: AutoLoRA's gated fusion and retriever, LiON-LoRA's feature
statistics and norm-consistent weights, Break-for-Make's frozen orthogonal projections and concatenation."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from zoo import tiny_unet

import lorakit
from lorakit.compose.break_for_make import break_adapters, make, orthonormal_rows
from lorakit.compose.gated_fusion import (
    GatedFusion,
    LoraRetriever,
    gated_fusion,
    lora_factors,
    spectral_summary,
    timestep_embedding,
)
from lorakit.compose.lion import LayerWeights, consistent_norms, feature_stats
from lorakit.errors import LorakitError
from lorakit.hosts.host import HostLayer, hosts
from lorakit.io.adapter_files import adapter_tensors

GEN = torch.Generator().manual_seed(0)
LATENTS, TEXT = torch.randn(2, 4, 8, 8, generator=GEN), torch.randn(2, 5, 12, generator=GEN)
CROSS_KV = ["attn2.to_k", "attn2.to_v"]  # read the text states only: their inputs never depend on adapters


def unet_with(names: list[str], targets: list[str], r: int = 2) -> nn.Module:
    """A tiny UNet with LoRAs ``names`` whose ``B`` are random (a non-zero update)."""
    unet = tiny_unet()
    for name in names:
        lorakit.adapt(unet, lorakit.LoraConfig(r=r, targets=targets, init="gaussian"), name)
    randomize_b(unet, names)
    return unet


def randomize_b(model: nn.Module, names: list[str], std: float = 0.5) -> None:
    with torch.no_grad():
        for host in hosts(model):
            for name in names:
                if name in host.adapters:
                    host.adapters[name].b.normal_(0, std)


def denoise(unet: nn.Module, t: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return unet(LATENTS, t, TEXT).sample


def layer_io(host: HostLayer, fn: Callable[[], object]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn()``'s input and output at ``host``."""
    seen = {}
    handle = host.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    fn()
    handle.remove()
    return seen["x"], seen["y"]


# -- AutoLoRA ----------------------------------------------------------------------------------------------------
def test_uniform_gates_equal_the_linear_sum_of_the_loras():
    unet = unet_with(["a", "b"], ["to_q", "to_v"])
    fusion = gated_fusion(unet, ["a", "b"])
    fusion.set_timestep(500)
    with lorakit.mix(unet, ["a", "b"], fusion):
        gated = denoise(unet)  # zero-initialised gates are 1 everywhere
    with lorakit.mix(unet, ["a", "b"], torch.ones(2)):
        fixed = denoise(unet)
    for path in fusion.keys:  # pinned uniform gates c on every layer: the linear sum scaled by c
        fusion.override(path, 500, torch.full((2,), 0.4))
    with lorakit.mix(unet, ["a", "b"], fusion):
        pinned = denoise(unet)
    with lorakit.mix(unet, ["a", "b"], torch.full((2,), 0.4)):
        scaled = denoise(unet)
    lorakit.set_active(unet, ["a", "b"])
    lorakit.merge(unet)
    merged = denoise(unet)
    assert not torch.allclose(merged, denoise(tiny_unet()), atol=1e-3)
    torch.testing.assert_close(gated, fixed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gated, merged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pinned, scaled, atol=1e-5, rtol=1e-5)


def test_a_gate_override_changes_only_its_layer_and_timestep():
    unet = unet_with(["a", "b"], ["to_q", "to_v"])
    fusion = gated_fusion(unet, ["a", "b"])
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(0, 0.3)
    inputs = {h.path: torch.randn(2, 3, h.geometry.d_in) for h in hosts(unet)}

    def gates_at(t: int) -> dict[str, torch.Tensor]:
        fusion.set_timestep(t)
        return {p: fusion(p, x) for p, x in inputs.items()}

    before = {t: gates_at(t) for t in (900, 100)}
    torch.testing.assert_close(timestep_embedding(0.0, 4), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    angles = torch.tensor([900.0, 9.0])  # t * f_j with f = (1, 10000^(-1/2))
    torch.testing.assert_close(timestep_embedding(900.0, 4), torch.cat([angles.sin(), angles.cos()]))
    assert not torch.allclose(before[900]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"],
                              before[100]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"])
    with lorakit.mix(unet, ["a", "b"], fusion):
        fusion.set_timestep(100)
        late = denoise(unet, 100)
        fusion.set_timestep(900)
        early = denoise(unet, 900)
        layer = "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"
        pinned = torch.tensor([1.7, -0.6])
        fusion.override(layer, 900, pinned)
        after = {t: gates_at(t) for t in (900, 100)}
        for t in (900, 100):
            for p in inputs:
                if (p, t) == (layer, 900):
                    assert torch.equal(after[t][p], pinned)
                else:
                    assert torch.equal(after[t][p], before[t][p])
        fusion.set_timestep(100)
        torch.testing.assert_close(denoise(unet, 100), late, atol=0, rtol=0)
        fusion.set_timestep(900)
        assert not torch.allclose(denoise(unet, 900), early, atol=1e-4)
        host = unet.get_submodule(layer)
        x, y = layer_io(host, lambda: denoise(unet, 900))
    base = host.base_layer(x)
    expected = base + sum(g * host.adapters[n](x, base, host.backend) for g, n in zip(pinned, "ab"))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_gates_train_through_a_sampling_loop():
    unet = unet_with(["a", "b"], ["to_q", "to_v"])
    fusion = lorakit.add_router(unet, "fusion", gated_fusion(unet, ["a", "b"]))
    assert set(lorakit.trainable_parameters(unet, "fusion")) == {
        f"lorakit_routers.fusion.{k}" for k, _ in fusion.named_parameters()}
    latents = LATENTS
    with lorakit.mix(unet, ["a", "b"], fusion):
        for t in (900, 500, 100):
            fusion.set_timestep(torch.tensor(t))
            latents = latents - 0.1 * unet(latents, t, TEXT).sample
    latents.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())


def test_gates_refuse_bad_arguments():
    fusion = GatedFusion(2, {"layer": 4})
    with pytest.raises(LorakitError, match="set_timestep"):
        fusion("layer", torch.randn(3, 4))
    fusion.set_timestep(10)
    with pytest.raises(LorakitError, match="do not serve"):
        fusion("other", torch.randn(3, 4))
    with pytest.raises(LorakitError, match=r"shape \(2,\)"):
        fusion.override("layer", 10, torch.ones(3))
    with pytest.raises(LorakitError, match="even integer"):
        GatedFusion(2, {"layer": 4}, t_dim=5)
    with pytest.raises(LorakitError, match="one number"):
        fusion.set_timestep(torch.tensor([1, 2]))


def library() -> dict[str, dict[str, torch.Tensor]]:
    """Three LoRAs of different ranks and strengths, as flattened (PEFT-keyed) state dicts."""
    unet = tiny_unet()
    for name, r, std in (("a", 1, 0.2), ("b", 2, 0.5), ("c", 4, 1.0)):
        lorakit.adapt(unet, lorakit.LoraConfig(r=r, targets=["to_q", "to_k", "to_v", "to_out.0"], init="random"), name)
        randomize_b(unet, [name], std)
    return {name: adapter_tensors(unet, name) for name in "abc"}


def test_the_retriever_ranks_the_lora_a_prompt_was_built_for_first():
    loras = library()
    layers = sorted(lora_factors(loras["a"]))
    retriever = LoraRetriever(layers, prompt_dim=16, dim=8, k=3)
    w, bias = retriever.prompt_proj.weight.detach(), retriever.prompt_proj.bias.detach()
    for name, state in loras.items():
        with torch.no_grad():
            prompt = torch.linalg.pinv(w) @ (retriever.encode_lora(state) - bias)  # maps onto its embedding
        ranked = retriever.rank(prompt, loras, top_m=3)
        assert ranked[0][0] == name and ranked[0][1] == pytest.approx(1.0, abs=1e-4) and ranked[1][1] < 0.99
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert len(retriever.rank(torch.randn(16), loras, top_m=2)) == 2
    kohya = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in loras["b"].items()}
    torch.testing.assert_close(retriever.encode_lora(kohya), retriever.encode_lora(loras["b"]))
    partial = {k: v for k, v in loras["c"].items() if ".attn1." in k}  # a LoRA on fewer layers encodes too
    assert retriever.encode_lora(partial).norm().item() == pytest.approx(1.0)


def test_spectral_summary_holds_the_singular_values_of_each_update():
    state = library()["c"]
    layers = sorted(lora_factors(state))
    summary = spectral_summary(state, layers, k=6).reshape(len(layers), 6)
    b, a = lora_factors(state)[layers[3]]
    expected = torch.cat([torch.linalg.svdvals(b @ a)[:4], torch.zeros(2)])  # rank 4, zero-padded to k
    scale = summary[3, 0] / expected[0]
    torch.testing.assert_close(summary[3], expected * scale, atol=1e-5, rtol=1e-4)
    assert summary.norm() == pytest.approx(1.0)
    with pytest.raises(LorakitError, match="does not know"):
        spectral_summary(state, layers[1:], k=2)
    with pytest.raises(LorakitError, match="no LoRA factors"):
        lora_factors({"layer.weight": torch.ones(2, 2)})
    with pytest.raises(LorakitError, match="one down and one up"):
        lora_factors({"layer.lora_A.weight": torch.ones(2, 2)})


def test_contrastive_training_pairs_prompts_with_their_loras():
    loras = library()
    retriever = LoraRetriever(sorted(lora_factors(loras["a"])), prompt_dim=16, dim=8, k=3)
    prompts = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    summaries = torch.stack([retriever.summary(state) for state in loras.values()])
    torch.testing.assert_close(retriever.encode_lora(summaries[1]), retriever.encode_lora(loras["b"]))
    optimizer = torch.optim.Adam(retriever.parameters(), lr=0.05)
    first = retriever.contrastive_loss(prompts, summaries).item()
    for _ in range(40):
        optimizer.zero_grad()
        retriever.contrastive_loss(prompts, summaries).backward()
        optimizer.step()
    assert retriever.contrastive_loss(prompts, summaries).item() < first / 4
    assert [retriever.rank(p, loras, top_m=1)[0][0] for p in prompts] == list(loras)
    with pytest.raises(LorakitError, match="top_m"):
        retriever.rank(prompts[0], loras, top_m=4)
    with pytest.raises(LorakitError, match="one row per summary"):
        retriever.contrastive_loss(prompts[:2], summaries)


# -- LiON-LoRA ---------------------------------------------------------------------------------------------------
def lion_unet() -> nn.Module:
    """``a``; ``b = -2 a`` (anti-parallel, twice the norm); ``c`` writes only the output units ``a`` leaves at 0."""
    unet = unet_with(["a", "b", "c"], CROSS_KV)
    with torch.no_grad():
        for host in hosts(unet):
            a, b, c = (host.adapters[n] for n in "abc")
            half = a.b.shape[0] // 2
            a.b[half:] = 0
            c.b[:half] = 0
            b.a.copy_(a.a)
            b.b.copy_(-2 * a.b)
    return unet


def test_feature_stats_measure_norms_and_orthogonality_per_layer():
    unet = lion_unet()
    stats = feature_stats(unet, ["a", "b", "c"], lambda: denoise(unet))
    assert set(stats) == {h.path for h in hosts(unet)}
    for path, layer in stats.items():
        cos = layer.cosine
        assert cos[0, 1] == pytest.approx(-1.0) and cos[0, 2] == pytest.approx(0.0, abs=1e-12)
        assert cos[0, 0] == pytest.approx(1.0)
        host = unet.get_submodule(path)
        delta = host.adapters["a"].lora_out(TEXT).detach().double()  # the text states are this layer's input
        assert layer.positions == 2 * 5
        assert layer.norms["a"] == pytest.approx(float(delta.norm() / 10 ** 0.5), rel=1e-5)
        assert layer.norms["b"] == pytest.approx(2 * layer.norms["a"], rel=1e-6)


def test_scaling_an_adapter_scales_its_contribution_linearly():
    unet = lion_unet()
    names = ["a", "b", "c"]
    unit = feature_stats(unet, names, lambda: denoise(unet))
    for s in (0.5, 3.0, -2.0):
        scaled = feature_stats(unet, names, lambda: denoise(unet), torch.tensor([s, 1.0, 1.0]))
        for path, layer in scaled.items():
            torch.testing.assert_close(layer.gram[0, 0], s * s * unit[path].gram[0, 0])
            torch.testing.assert_close(layer.gram[0, 1], s * unit[path].gram[0, 1])
            assert layer.norms["b"] == pytest.approx(unit[path].norms["b"])
    host = next(hosts(unet))
    with lorakit.mix(unet, ["a"], torch.tensor([1.0])):
        one = host(TEXT) - host.base_layer(TEXT)
    with lorakit.mix(unet, ["a"], LayerWeights({}, torch.tensor([1.0])).scaled(-3.0)):
        torch.testing.assert_close(host(TEXT) - host.base_layer(TEXT), -3.0 * one)


def test_consistent_norms_equalise_every_contribution():
    unet = unet_with(["a", "b"], CROSS_KV)
    run = lambda: denoise(unet)
    unit = feature_stats(unet, ["a", "b"], run)
    spread = [v for layer in unit.values() for v in layer.norms.values()]
    assert max(spread) > 1.2 * min(spread)
    weights = consistent_norms(unit, ["a", "b"], target=0.3)
    for layer in feature_stats(unet, ["a", "b"], run, weights).values():
        assert list(layer.norms.values()) == pytest.approx([0.3, 0.3])
    mean = sum(spread) / len(spread)
    for layer in feature_stats(unet, ["a", "b"], run, consistent_norms(unit, ["a", "b"])).values():
        assert list(layer.norms.values()) == pytest.approx([mean, mean])


def test_lion_tools_refuse_bad_arguments():
    unet = unet_with(["a"], CROSS_KV)
    with pytest.raises(LorakitError, match="reached no layer"):
        feature_stats(unet, ["a"], lambda: None)
    with pytest.raises(LorakitError, match="unknown adapter"):
        feature_stats(unet, ["zz"], lambda: denoise(unet))
    with pytest.raises(LorakitError, match="no weights for layer"):
        LayerWeights({"x": torch.ones(1)})("y", TEXT)
    with pytest.raises(LorakitError, match="one shape"):
        LayerWeights({"x": torch.ones(1), "y": torch.ones(2)})
    with torch.no_grad():
        for host in hosts(unet):
            host.adapters["a"].b.zero_()
    with pytest.raises(LorakitError, match="zero norm"):
        consistent_norms(feature_stats(unet, ["a"], lambda: denoise(unet)), ["a"])


# -- Break-for-Make ----------------------------------------------------------------------------------------------
def broken() -> nn.Module:
    unet = tiny_unet()
    break_adapters(unet, ["to_q", "to_k"], r_content=2, r_style=3, seed=0)
    return unet


def test_break_gives_frozen_orthogonal_down_projections_and_trains_b_only():
    unet = broken()
    for host in hosts(unet):
        a_c, a_s = host.adapters["content"].a, host.adapters["style"].a
        torch.testing.assert_close(a_c @ a_s.T, torch.zeros(2, 3), atol=1e-6, rtol=0)
        torch.testing.assert_close(a_c @ a_c.T, torch.eye(2), atol=1e-6, rtol=0)
        torch.testing.assert_close(a_s @ a_s.T, torch.eye(3), atol=1e-6, rtol=0)
    assert all(".lora_B." in k for k in lorakit.trainable_parameters(unet, "content"))
    lorakit.set_active(unet, "content")
    unet(LATENTS, 500, TEXT).sample.square().mean().backward()
    for host in hosts(unet):
        content, style = host.adapters["content"], host.adapters["style"]
        assert content.a.grad is None and not content.a.requires_grad
        assert content.b.grad is not None and content.b.grad.abs().sum() > 0
        assert style.b.grad is None  # trained separately: the style adapter is untouched
    again = tiny_unet()
    break_adapters(again, ["to_q", "to_k"], r_content=2, r_style=3, seed=0)
    assert all(torch.equal(h.adapters["style"].a, g.adapters["style"].a) for h, g in zip(hosts(unet), hosts(again)))


def test_made_adapter_equals_the_sum_of_content_and_style():
    unet = broken()
    randomize_b(unet, ["content", "style"])
    make(unet, "content", "style", "made")
    with lorakit.mix(unet, ["content", "style"], torch.ones(2)):
        summed = denoise(unet)
    lorakit.set_active(unet, "made")
    torch.testing.assert_close(denoise(unet), summed, atol=1e-5, rtol=1e-5)
    for name, r, alpha in (("x", 2, 6.0), ("y", 1, 0.5)):  # plain LoRAs, scales alpha / r of 3 and 0.5
        lorakit.adapt(unet, lorakit.LoraConfig(r=r, alpha=alpha, targets=["to_q", "to_k"], init="random"), name)
    make(unet, "x", "y", "xy")
    for host in hosts(unet):
        for first, second, made in (("content", "style", "made"), ("x", "y", "xy")):
            c, s, m = (host.adapters[n] for n in (first, second, made))
            torch.testing.assert_close(m.merge_delta(None), c.merge_delta(None) + s.merge_delta(None))
    assert all(".lora_B." in k for k in lorakit.trainable_parameters(unet, "made"))
    make(unet, "content", "style", "tunable", train_a=True)
    assert any(".lora_A." in k for k in lorakit.trainable_parameters(unet, "tunable"))


def test_on_the_content_row_space_the_made_adapter_is_the_content_adapter():
    unet = broken()
    randomize_b(unet, ["content", "style"])
    make(unet, "content", "style", "made")
    randomize_b(unet, ["style"], std=3.0)
    make(unet, "content", "style", "restyled")
    for host in hosts(unet):
        x = torch.randn(6, 2) @ host.adapters["content"].a  # inside the content row space
        outputs = {}
        for name in ("content", "made", "restyled", "style"):
            lorakit.set_active(unet, name)
            outputs[name] = host(x) - host.base_layer(x)
        torch.testing.assert_close(outputs["made"], outputs["content"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["restyled"], outputs["content"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["style"], torch.zeros(6, host.geometry.d_out), atol=1e-5, rtol=0)


def test_break_and_make_refuse_bad_arguments():
    unet = tiny_unet()
    with pytest.raises(LorakitError, match="input width"):
        break_adapters(unet, ["attn2.to_k"], r_content=8, r_style=8)  # 16 rows of a 12-wide input
    assert lorakit.configs(unet) == {}  # the failed break left the model untouched
    with pytest.raises(LorakitError, match="rows"):
        orthonormal_rows(5, 4, torch.Generator())
    break_adapters(unet, ["to_q"], 1, 1)
    with pytest.raises(LorakitError, match="already exist"):
        break_adapters(unet, ["to_v"], 1, 1, names=("content", "other"))
    lorakit.adapt(unet, lorakit.LoraConfig(r=1, targets=["to_v"]), "elsewhere")
    with pytest.raises(LorakitError, match="same layers"):
        make(unet, "content", "elsewhere", "made")


def test_gates_save_and_reload_as_a_router(tmp_path):
    from lorakit.io.routers import load_router, save_router

    unet = unet_with(["a", "b"], ["to_q", "to_v"])
    fusion = lorakit.add_router(unet, "fusion", gated_fusion(unet, ["a", "b"]))
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    save_router(unet, tmp_path, "fusion")
    lorakit.delete_router(unet, "fusion")
    loaded = load_router(unet, tmp_path, "again")
    for layer in loaded.keys:
        x = torch.randn(2, 5, loaded.gates[loaded.keys[layer]].in_features - loaded.t_dim)
        fusion.set_timestep(300), loaded.set_timestep(300)
        torch.testing.assert_close(loaded(layer, x), fusion(layer, x))
