"""Multi-LoRA composition while sampling a diffusion UNet: CMLoRA (frequency-ordered cached fusion) and CLoRA
(contrastive cross-attention latent updates, attention-mask fusion), on a tiny UNet2DConditionModel."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
from zoo import perturb, tiny_unet

import lorakit
from lorakit.compose import cached, contrastive
from lorakit.errors import LorakitError

NAMES = ["a", "b", "c"]
GEN = torch.Generator().manual_seed(0)
LATENTS = torch.randn(1, 4, 8, 8, generator=GEN)
STATES = torch.randn(1, 6, 12, generator=GEN)
CONCEPTS = [[1, 2], [3], [4]]  # LoRA i's concept: token indices of the prompt


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    model = tiny_unet()
    torch.manual_seed(1)
    for name in NAMES:
        lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["to_q", "to_k", "to_v", "to_out.0"], init="gaussian"),
                      name)
    perturb(model, std=0.5)
    return model


@contextlib.contextmanager
def counting(model: torch.nn.Module) -> Iterator[list[int]]:
    """UNet forward calls, counted."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def plain(model: torch.nn.Module, name: str, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet with only ``name`` active, the ordinary way."""
    lorakit.set_active(model, [name])
    with torch.no_grad():
        return model(latents, t, encoder_hidden_states=STATES).sample


def plain_sample(model: torch.nn.Module, name: str, steps: int) -> torch.Tensor:
    timesteps, step = cached.ddim(steps)
    latents = LATENTS
    for t in timesteps:
        latents = step(plain(model, name, latents, t), t, latents)
    return latents


# ---- CMLoRA --------------------------------------------------------------------------------------------------------

def test_ddim_steps_down_deterministically():
    timesteps, step = cached.ddim(4)
    assert timesteps.tolist() == [750, 500, 250, 0]
    eps = torch.randn(LATENTS.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(step(eps, timesteps[0], LATENTS), step(eps, timesteps[0], LATENTS), rtol=0, atol=0)
    assert not torch.equal(step(eps, timesteps[0], LATENTS), LATENTS)


def test_lora_noise_runs_one_lora_or_the_base(unet):
    t = torch.tensor(500)
    torch.testing.assert_close(cached.lora_noise(unet, "b", LATENTS, t, STATES), plain(unet, "b", LATENTS, t))
    with torch.no_grad(), lorakit.disable(unet):
        base = unet(LATENTS, t, encoder_hidden_states=STATES).sample
    torch.testing.assert_close(cached.lora_noise(unet, None, LATENTS, t, STATES), base)
    assert not torch.allclose(base, plain(unet, "b", LATENTS, t))


def test_high_frequency_share_separates_bands():
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    flat, checker, smooth = torch.ones(8, 8), (-1.0) ** (i + j), torch.cos(2 * torch.pi * i / 8)  # 0, 0.5, 0.125 cyc.
    assert cached.high_frequency_share(flat).item() == pytest.approx(0.0, abs=1e-6)
    assert cached.high_frequency_share(smooth).item() == pytest.approx(0.0, abs=1e-6)
    assert cached.high_frequency_share(checker).item() == pytest.approx(1.0)
    assert cached.high_frequency_share(flat + checker).item() == pytest.approx(0.5)
    assert cached.high_frequency_share(torch.zeros(8, 8)).item() == 0.0


def test_frequency_scores_measure_each_lora_effect(unet):
    t = torch.tensor(500)
    with counting(unet) as calls:
        scores = cached.frequency_scores(unet, NAMES, LATENTS, t, STATES)
    assert calls[0] == len(NAMES) + 1 and scores.shape == (3,)
    base = cached.lora_noise(unet, None, LATENTS, t, STATES)
    expected = [cached.high_frequency_share(plain(unet, n, LATENTS, t) - base) for n in NAMES]
    torch.testing.assert_close(scores, torch.stack(expected))
    assert len(set(scores.tolist())) == 3 and ((scores > 0) & (scores < 1)).all()
    again = cached.frequency_scores(unet, NAMES, LATENTS, t, STATES)
    assert cached.frequency_order(NAMES, again) == cached.frequency_order(NAMES, scores)  # deterministic sequencing


def test_frequency_order_follows_scores_deterministically():
    scores = torch.tensor([0.2, 0.9, 0.5])
    assert cached.frequency_order(NAMES, scores) == ["b", "c", "a"]
    assert cached.frequency_order(NAMES, scores, high_first=False) == ["a", "c", "b"]
    assert cached.frequency_order(NAMES, torch.tensor([0.5, 0.1, 0.5])) == ["a", "c", "b"]  # ties: given order
    with pytest.raises(LorakitError, match="scores"):
        cached.frequency_order(NAMES, torch.tensor([0.2, 0.9]))


def test_cache_plan_recomputes_the_dominant_lora_and_stale_caches():
    assert cached.cache_plan(NAMES, [1, 2, 3], 6) == [
        ["a", "b", "c"], ["a", "b"], ["a", "c"], ["a", "b"], ["a", "b"], ["a", "c"]]
    assert cached.cache_plan(["a", "b"], [5, 5], 5, switch_every=2) == [["a", "b"], ["a"], ["b"], ["b"], ["a"]]
    assert cached.cache_plan(NAMES, [1, 1, 1], 3) == [NAMES] * 3


def test_one_lora_with_interval_one_is_plain_sampling(unet):
    timesteps, step = cached.ddim(4)
    out = cached.cmlora_sample(unet, ["b"], LATENTS, STATES, timesteps, step, intervals=[1])
    torch.testing.assert_close(out.latents, plain_sample(unet, "b", 4), rtol=0, atol=1e-6)
    assert out.evaluations == [1] * 4


def test_unet_evaluations_follow_the_cache_plan(unet):
    timesteps, step = cached.ddim(6)
    per_step: list[int] = []
    with counting(unet) as calls:
        def counted_step(eps, t, latents):
            per_step.append(calls[0] - sum(per_step))
            return step(eps, t, latents)
        out = cached.cmlora_sample(unet, NAMES, LATENTS, STATES, timesteps, counted_step, intervals=[1, 2, 3])
    expected = [len(due) for due in cached.cache_plan(NAMES, [1, 2, 3], 6)]
    assert per_step == out.evaluations == expected == [3, 2, 2, 2, 2, 2]


def uncached(model: torch.nn.Module, steps: int) -> torch.Tensor:
    timesteps, step = cached.ddim(steps)
    latents = LATENTS
    for t in timesteps:
        latents = step(torch.stack([plain(model, n, latents, t) for n in NAMES]).mean(0), t, latents)
    return latents


def test_all_intervals_one_is_the_uncached_composition_and_caches_are_reused(unet):
    timesteps, step = cached.ddim(4)
    every = cached.cmlora_sample(unet, NAMES, LATENTS, STATES, timesteps, step, intervals=[1, 1, 1])
    torch.testing.assert_close(every.latents, uncached(unet, 4), rtol=0, atol=1e-6)
    # "a" dominant throughout, "b" and "c" computed once at the first step and reused
    reused = cached.cmlora_sample(unet, NAMES, LATENTS, STATES, timesteps, step, [1, 9, 9], switch_every=4)
    latents, first = LATENTS, {n: plain(unet, n, LATENTS, timesteps[0]) for n in NAMES}
    for t in timesteps:
        eps = (plain(unet, "a", latents, t) + first["b"] + first["c"]) / 3
        latents = step(eps, t, latents)
    torch.testing.assert_close(reused.latents, latents, rtol=0, atol=1e-5)
    assert reused.evaluations == [3, 1, 1, 1]


def test_cmlora_refuses_bad_arguments(unet):
    timesteps, step = cached.ddim(2)
    for names, intervals, match in [([], [], "at least one"), (["a", "a"], [1, 1], "distinct"),
                                    (["zz"], [1], "adapter of this UNet"), (["a", "b"], [1], "one interval"),
                                    (["a", "b"], [1, 0], ">= 1")]:
        with pytest.raises(LorakitError, match=match):
            cached.cmlora_sample(unet, names, LATENTS, STATES, timesteps, step, intervals)
    with pytest.raises(LorakitError, match="switch_every"):
        cached.cmlora_sample(unet, ["a"], LATENTS, STATES, timesteps, step, [1], switch_every=0)
    with pytest.raises(LorakitError, match="cutoff"):
        cached.high_frequency_share(LATENTS, cutoff=0.5)
    with pytest.raises(LorakitError, match="steps"):
        cached.ddim(0)


# ---- CLoRA ---------------------------------------------------------------------------------------------------------

def test_capture_records_softmax_maps_and_leaves_the_unet_as_it_was(unet):
    t = torch.tensor(500)
    before, processors = plain(unet, "a", LATENTS, t), unet.attn_processors
    with contrastive.capture_cross_attention(unet) as store:
        plain(unet, "a", LATENTS, t)
    assert [r.shape for r in store] == [(1, 64, 6), (1, 16, 6), (1, 64, 6), (1, 64, 6)]  # down, mid, up, up
    for r in store:
        torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[:2]))
    with pytest.raises(RuntimeError, match="boom"), contrastive.capture_cross_attention(unet):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is p for k, p in processors.items())
    assert not any(m._forward_hooks for m in unet.modules())  # every recording hook removed
    torch.testing.assert_close(plain(unet, "a", LATENTS, t), before, rtol=0, atol=0)


def test_lora_attention_pass_predicts_the_plain_noise(unet):
    t = torch.tensor(250)
    eps, maps = contrastive.lora_attention(unet, "c", LATENTS, t, STATES)
    torch.testing.assert_close(eps, plain(unet, "c", LATENTS, t), rtol=0, atol=0)  # recording changes nothing
    assert maps.shape == (1, 6, 8, 8)
    torch.testing.assert_close(maps.sum(1), torch.ones(1, 8, 8))  # a mean of per-pixel softmaxes over tokens


def test_attention_maps_resize_every_layer_to_the_latent():
    fine = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(2))
    coarse = torch.full((2, 16, 3), 0.25)
    maps = contrastive.attention_maps([fine, coarse], (8, 8))
    expected = (fine.transpose(1, 2).reshape(2, 3, 8, 8) + 0.25) / 2  # a constant map stays constant when upsampled
    torch.testing.assert_close(maps, expected)
    with pytest.raises(LorakitError, match="halved"):
        contrastive.attention_maps([torch.rand(1, 10, 3)], (8, 8))


def test_contrastive_loss_is_the_infonce_of_the_documented_form():
    left, right = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    left[0, 0, :, 0], left[0, 1, :, 1] = 1.0, 1.0  # concept 0 (token 0) on column 0, concept 1 (token 1) on column 1
    tau = 0.5
    expected = torch.log1p(2 * torch.exp(torch.tensor(-1 / tau)))  # 1 positive at s = 1/tau, 2 orthogonal negatives
    torch.testing.assert_close(contrastive.contrastive_loss([left, left], [[0], [1]], tau), expected)
    right[0, :, :, 0] = 1.0  # both concepts on column 0: merged, a higher loss
    assert contrastive.contrastive_loss([right, right], [[0], [1]], tau) > expected
    assert contrastive.contrastive_loss([left], [[0, 1]], tau).item() == 0.0  # one concept: no negatives


def test_masks_partition_the_latent(unet):
    maps = [contrastive.lora_attention(unet, n, LATENTS, torch.tensor(500), STATES)[1] for n in NAMES]
    masks = contrastive.semantic_masks(maps, CONCEPTS)
    assert masks.shape == (3, 1, 1, 8, 8) and set(masks.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(masks.sum(0), torch.ones(1, 1, 8, 8))
    assert (masks.flatten(1).sum(1) > 0).sum() >= 2  # more than one LoRA owns pixels
    halves = torch.zeros(2, 1, 2, 4, 4)
    halves[0, 0, 0, :, :2], halves[0, 0, 0, :, 2:], halves[1, 0, 1, :, 2:] = 0.9, 0.3, 0.2
    split = contrastive.semantic_masks(list(halves), [[0], [1]])  # max-normalised: concept 1 (1.0) beats 0 (1/3)
    assert split[0, 0, 0, :, :2].eq(1).all() and split[1, 0, 0, :, 2:].eq(1).all()


def test_single_lora_mask_is_all_ones_and_its_step_is_the_lora_step(unet):
    timesteps, step = cached.ddim(4)
    t = timesteps[0]
    out = contrastive.clora_step(unet, ["b"], LATENTS, t, STATES, [[1, 2]], step, step_size=5.0)
    assert out.masks.eq(1).all() and out.loss.item() == 0.0
    torch.testing.assert_close(out.latents, step(plain(unet, "b", LATENTS, t), t, LATENTS), rtol=0, atol=0)
    sample = contrastive.clora_sample(unet, ["b"], LATENTS, STATES, [[1, 2]], timesteps, step, step_size=5.0)
    torch.testing.assert_close(sample, plain_sample(unet, "b", 4), rtol=0, atol=0)


def test_latent_update_lowers_the_contrastive_loss(unet):
    t = torch.tensor(750)
    moved, before = contrastive.update_latents(unet, NAMES, LATENTS, t, STATES, CONCEPTS, step_size=0.01)
    _, after = contrastive.update_latents(unet, NAMES, moved, t, STATES, CONCEPTS, step_size=0.01)
    assert before > 0 and after < before and not torch.equal(moved, LATENTS)


def test_clora_step_takes_each_pixel_from_its_mask_lora(unet):
    t = torch.tensor(500)
    out = contrastive.clora_step(unet, ["a", "b"], LATENTS, t, STATES, [[1, 2], [3]], lambda eps, t, z: eps,
                                 update=False)
    eps_a, eps_b = plain(unet, "a", LATENTS, t), plain(unet, "b", LATENTS, t)
    picked = torch.where(out.masks[0].bool(), eps_a, eps_b)
    torch.testing.assert_close(out.latents, picked, rtol=0, atol=0)
    assert 0 < out.masks[0].sum() < 64


def test_clora_sample_updates_only_the_first_steps(unet):
    timesteps, step = cached.ddim(3)
    with counting(unet) as calls:
        contrastive.clora_sample(unet, ["a", "b"], LATENTS, STATES, [[1], [2]], timesteps, step, update_steps=1)
    assert calls[0] == 2 * 2 + 2 + 2  # update + fusion passes, then fusion passes only


def test_clora_refuses_bad_arguments(unet):
    t, step = torch.tensor(500), cached.ddim(2)[1]
    for names, states, concepts, match in [
            ([], STATES, [], "at least one"), (["a", "b"], STATES, [[1]], "one token list per LoRA"),
            (["a"], STATES, [[9]], r"in \[0, 6\)"), (["a"], STATES, [[]], "non-empty"),
            (["a", "b"], STATES, [[1], [1]], "share tokens"), (["a", "b"], [STATES], [[1], [2]], "one per LoRA")]:
        with pytest.raises(LorakitError, match=match):
            contrastive.clora_step(unet, names, LATENTS, t, states, concepts, step)
    with pytest.raises(LorakitError, match="temperature"):
        contrastive.clora_step(unet, ["a", "b"], LATENTS, t, STATES, [[1], [2]], step, temperature=0.0)
    with pytest.raises(LorakitError, match="update_steps"):
        contrastive.clora_sample(unet, ["a"], LATENTS, STATES, [[1]], [500], step, update_steps=2)
