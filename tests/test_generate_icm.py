"""ICM-LoRA (a conditional VAE generating a LoRA from a task context), on a tiny random Llama (vocabulary 96);
Trans-LoRA's tests are in test_generate_trans.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from zoo import perturb, tiny_llama

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.generate.icm_lora import (
    ConditionalVAE,
    IcmGenerator,
    Layout,
    Standardizer,
    elbo_loss,
    fit_generator,
    flatten_adapter,
    generate_adapter,
    sequence_features,
    task_context,
    unflatten,
)
from lorakit.hosts.host import adapters_named
from lorakit.io.adapter_files import adapter_tensors, attach_adapter

VOCAB = 96
LORA = lorakit.LoraConfig(r=4, alpha=4.0, targets=["q_proj", "v_proj", "lm_head"])


def bump(centre: float) -> Tensor:
    v = torch.arange(VOCAB, dtype=torch.float32)
    return torch.softmax(-(v - centre) ** 2 / (2 * 6.0**2), 0)


# ---------------------------------------------------------------- ICM-LoRA: a family of tasks indexed by t in [0, 1]
# Task t: every next token follows p_t = (1 - t) bump(24) + t bump(72). Its examples share their random draws across
# t (a token flips from its bump-24 draw to its bump-72 draw when u < t), so data, adapters and contexts move smoothly.
TS = torch.linspace(0.05, 0.95, 16)
Bank = tuple[Tensor, Tensor, Layout]  # flat adapters (16, d), task contexts (16, 32), their layout
HELD = 5


def target(t: float) -> Tensor:
    return (1 - t) * bump(24.0) + t * bump(72.0)


def examples(t: float, n: int, seed: int, length: int = 16) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, length, generator=g)
    low, high = (torch.multinomial(bump(c), n * length, True, generator=g).view(n, length) for c in (24.0, 72.0))
    return torch.where(u < t, high, low)


def task_loss(model: nn.Module, t: float, ids: Tensor) -> Tensor:
    """Cross-entropy of the model's next-token distributions against p_t."""
    return -(model(input_ids=ids).logits.log_softmax(-1) * target(t)).sum(-1).mean()


def train_task_adapter(model: nn.Module, t: float, name: str) -> None:
    """30 SGD steps from one shared initialisation (seed 0) on task t."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lorakit.adapt(model, LORA, name)
    optimizer = torch.optim.SGD(lorakit.trainable_parameters(model, name).values(), lr=0.1, momentum=0.9)
    data = examples(t, 16, seed=5)
    for _ in range(30):
        loss = task_loss(model, t, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def bank() -> Bank:
    """Flat adapters (16, d), task contexts (16, 32) and the layout of a bank of 16 task LoRAs."""
    model, vectors, contexts = tiny_llama(), [], []
    for i, t in enumerate(TS.tolist()):
        train_task_adapter(model, t, f"task{i}")
        vector, layout = flatten_adapter(model, f"task{i}")
        vectors.append(vector)
        contexts.append(task_context(model, examples(t, 256, seed=0)))
        lorakit.delete_adapter(model, f"task{i}")
    return torch.stack(vectors), torch.stack(contexts), layout


@pytest.fixture(scope="module")
def generator(bank: Bank) -> IcmGenerator:
    vectors, contexts, layout = bank
    keep = [i for i in range(len(TS)) if i != HELD]
    return fit_generator(vectors[keep], contexts[keep], layout)


def delta_w(model: nn.Module, name: str) -> Tensor:
    return torch.cat([torch.mm(*a.factors()).reshape(-1) for _, a in adapters_named(model, name)])


def with_vector(vector: Tensor, layout: Layout) -> nn.Module:
    return attach_adapter(tiny_llama(), layout.config, unflatten(vector, layout), "x", "test")


def test_flatten_unflatten_round_trip_is_exact() -> None:
    model = lorakit.adapt(tiny_llama(), LORA, "a")
    perturb(model)
    vector, layout = flatten_adapter(model, "a")
    tensors = adapter_tensors(model, "a")
    assert layout.keys == tuple(tensors) and vector.shape == (layout.size,)
    assert layout.size == sum(p.numel() for p in lorakit.trainable_parameters(model, "a").values())
    back = unflatten(vector, layout)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    again, _ = flatten_adapter(attach_adapter(tiny_llama(), layout.config, back, "b", "test"), "b")
    assert torch.equal(again, vector)


def test_standardizer_normalises_each_segment() -> None:
    rows = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 1.0, 10.0, 10.0, 10.0])
    norm = Standardizer.fit(rows, [2, 3])
    encoded = norm.encode(rows)
    assert torch.allclose(encoded.mean(0), torch.zeros(5), atol=1e-6)
    for segment in encoded.split([2, 3], dim=1):
        assert segment.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(norm.decode(encoded), rows, atol=1e-5)
    still = torch.cat([rows[:, :2], torch.full((6, 1), 4.0) + 1e-6 * rows[:, 2:3]], 1)  # a column that barely moves
    assert Standardizer.fit(still, [2, 1]).scale[2].item() == pytest.approx(4e-3, rel=1e-3)  # floored at 1e-3 RMS
    with pytest.raises(ConfigError):
        Standardizer.fit(rows, [2, 2])


def test_elbo_loss_is_reconstruction_plus_beta_kl() -> None:
    recon, target_w = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    mean, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    kl = 0.5 * (1.0 + (torch.e - 1 - 1.0))  # 0.5 * sum(m^2 + e^v - 1 - v)
    assert elbo_loss(recon, target_w, mean, logvar, 0.5).item() == pytest.approx(2.5 + 0.5 * kl, rel=1e-6)
    assert elbo_loss(recon, target_w, torch.zeros(1, 2), torch.zeros(1, 2), 3.0).item() == pytest.approx(2.5)


def test_conditional_vae_shapes_and_seeded_sampling() -> None:
    cvae = ConditionalVAE(dim=10, context_dim=3, latent=2, hidden=8)
    w, c = torch.randn(4, 10), torch.randn(4, 3)
    mean, logvar = cvae.encode(w, c)
    assert mean.shape == logvar.shape == (4, 2) and cvae.decode(mean, c).shape == (4, 10)
    first = cvae(w, c, torch.Generator().manual_seed(1))[0]
    assert torch.equal(first, cvae(w, c, torch.Generator().manual_seed(1))[0])
    assert not torch.equal(first, cvae(w, c, torch.Generator().manual_seed(2))[0])


def test_sequence_features_and_context_ignore_adapters() -> None:
    model, ids = tiny_llama(), examples(0.5, 4, seed=0)
    before = task_context(model, ids)
    lorakit.adapt(model, LORA.replace(init="random"), "a")
    features = sequence_features(model, ids)
    assert features.shape == (4, 32) and torch.allclose(features.mean(0), before)
    with lorakit.disable(model):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(features, hidden.mean(1))
    with pytest.raises(ConfigError):
        sequence_features(model, ids.float())


def test_generator_reproduces_training_adapters(bank: Bank, generator: IcmGenerator) -> None:
    vectors, contexts, _ = bank
    keep = [i for i in range(len(TS)) if i != HELD]
    spread = (vectors[keep] - vectors[keep].mean(0)).norm(dim=1).pow(2).mean().sqrt()  # RMS distance to the mean
    error = (generator.generate(contexts[keep]) - vectors[keep]).norm(dim=1)
    assert error.max() < 0.1 * spread


def test_held_out_generation_beats_the_bank_mean(bank: Bank, generator: IcmGenerator) -> None:
    vectors, contexts, layout = bank
    keep = [i for i in range(len(TS)) if i != HELD]
    t, data = float(TS[HELD]), examples(float(TS[HELD]), 16, seed=9)
    vectors_by = {"true": vectors[HELD], "generated": generator.generate(contexts[HELD]), "mean": vectors[keep].mean(0)}
    models = {k: with_vector(v, layout) for k, v in vectors_by.items()}
    delta = {k: delta_w(m, "x") for k, m in models.items()}
    with torch.no_grad():
        loss = {k: task_loss(m, t, data).item() for k, m in models.items()}
        base = task_loss(tiny_llama(), t, data).item()
    assert loss["true"] < base - 0.3  # the trained adapter learned its task
    assert (delta["generated"] - delta["true"]).norm() < 0.5 * (delta["mean"] - delta["true"]).norm()
    assert loss["generated"] < loss["true"] + 0.25 * (loss["mean"] - loss["true"])


def test_generated_adapter_is_a_real_savable_adapter(bank: Bank, generator: IcmGenerator, tmp_path: Path) -> None:
    _, contexts, _ = bank
    model = generate_adapter(tiny_llama(), generator, contexts[HELD], "gen")
    assert lorakit.active_adapters(model) == ["gen"]
    assert torch.equal(flatten_adapter(model, "gen")[0], generator.generate(contexts[HELD]))
    ids = examples(0.3, 2, seed=3)
    lorakit.save_adapter(model, tmp_path / "gen", "gen")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "gen", "gen")
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, out)
        assert not torch.allclose(tiny_llama()(input_ids=ids).logits, out, atol=1e-3)
    with pytest.raises(LorakitError):  # the name is taken: the model keeps its adapter
        generate_adapter(model, generator, contexts[0], "gen")
    assert torch.equal(flatten_adapter(model, "gen")[0], generator.generate(contexts[HELD]))


def test_icm_refuses_bad_inputs(bank: Bank, generator: IcmGenerator) -> None:
    vectors, contexts, layout = bank
    with pytest.raises(ConfigError):
        unflatten(vectors[0][:-1], layout)
    with pytest.raises(ConfigError):
        generator.generate(torch.zeros(31))
    with pytest.raises(ConfigError):
        generate_adapter(tiny_llama(), generator, contexts[:2], "x")
    with pytest.raises(ConfigError):
        fit_generator(vectors[:3], contexts[:2], layout, steps=1)
    with pytest.raises(ConfigError):
        fit_generator(vectors[:1], contexts[:1], layout, steps=1)
    with pytest.raises(ConfigError):
        fit_generator(vectors[:2, :-1], contexts[:2], layout, steps=1)
    with pytest.raises(ConfigError):
        fit_generator(torch.full_like(vectors[:2], float("nan")), contexts[:2], layout, steps=1)
    mos = lorakit.adapt(tiny_llama(), lorakit.MosConfig(r=4, targets=["q_proj"]), "m")
    with pytest.raises(ConfigError):  # integer shard indices are not weights a generator emits
        flatten_adapter(mos, "m")
