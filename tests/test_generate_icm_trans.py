"""ICM-LoRA (a conditional VAE generating a LoRA from a task context) and Trans-LoRA (moving a LoRA to another base
by distillation on discriminator-filtered synthetic data), on tiny random Llama / GPT-2 models (vocabulary 96)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from zoo import perturb, tiny_gpt2, tiny_llama

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
from lorakit.generate.trans_lora import (
    Discriminator,
    distill,
    filter_synthetic,
    fit_discriminator,
    kl_to_teacher,
    synthesize,
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


# ------------------------------------------------------------ Trans-LoRA: one task, a handful of real samples
# The task's tokens lean along one direction of the source base's embeddings (p ~ exp(2 z), z the standardised
# projection), so the base's features can tell task-like sequences apart, as a real LLM's features would.
def _task_distribution() -> Tensor:
    z = tiny_llama().model.embed_tokens.weight.detach() @ torch.randn(32, generator=torch.Generator().manual_seed(11))
    return torch.softmax(2.0 * (z - z.mean()) / z.std(), 0)


TASK = _task_distribution()


def task_samples(n: int, seed: int) -> Tensor:
    return torch.multinomial(TASK, n * 16, True, generator=torch.Generator().manual_seed(seed)).view(n, 16)


def task_likelihood(ids: Tensor) -> float:
    return TASK[ids].log().mean().item()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """The source base (tiny Llama, seed 0) with LoRA "src" trained 40 Adam steps on the task."""
    model = tiny_llama()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lorakit.adapt(model, LORA, "src")
    optimizer = torch.optim.Adam(lorakit.trainable_parameters(model, "src").values(), lr=1e-2)
    for step in range(40):
        ids = task_samples(16, seed=100 + step)
        loss = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def kept(source: nn.Module) -> Tensor:
    """The pipeline's steps 1-3: 64 synthetic samples, filtered by a discriminator fitted on 8 real ones."""
    real = task_samples(8, seed=1)
    synthetic = synthesize(source, real, 64, 14)
    return filter_synthetic(synthetic, fit_discriminator(source, real, synthetic).scorer(source))


def student(make: Callable[[], nn.Module], targets: list[str]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return lorakit.adapt(make(), lorakit.LoraConfig(r=4, alpha=4.0, targets=targets), "dst")


def test_synthesize_samples_the_adapted_source(source: nn.Module) -> None:
    real = task_samples(3, seed=1)
    samples = synthesize(source, real, 5, 10, prefix=2, seed=4)
    assert samples.shape == (5, 12) and torch.equal(samples[:, :2], real[[0, 1, 2, 0, 1], :2])
    assert torch.equal(samples, synthesize(source, real, 5, 10, prefix=2, seed=4))
    assert not torch.equal(samples, synthesize(source, real, 5, 10, prefix=2, seed=5))
    greedy = real[:, :2]
    with torch.no_grad():
        for _ in range(4):
            greedy = torch.cat([greedy, source(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(synthesize(source, real, 3, 4, temperature=1e-4), greedy)
    with lorakit.disable(source):
        from_base = synthesize(source, real, 32, 14)
    assert task_likelihood(synthesize(source, real, 32, 14)[:, 2:]) > task_likelihood(from_base[:, 2:]) + 2.0


def test_filter_keeps_what_the_scorer_calls_task_like() -> None:
    samples = torch.tensor([[10, 1], [60, 2], [47, 3], [48, 4], [0, 5]])
    scores = {10: 0.9, 60: 0.1, 47: 0.5, 48: 0.49, 0: 1.0}
    scorer = lambda ids: torch.tensor([scores[int(i)] for i in ids[:, 0]])
    assert torch.equal(filter_synthetic(samples, scorer), samples[[0, 2, 4]])
    assert torch.equal(filter_synthetic(samples, scorer, threshold=0.95), samples[[4]])
    assert filter_synthetic(samples, scorer, threshold=1.0).shape == (1, 2)
    with pytest.raises(ConfigError):
        filter_synthetic(samples, lambda ids: torch.ones(2))
    with pytest.raises(ConfigError):
        filter_synthetic(samples, scorer, threshold=1.5)


def test_discriminator_scorer_is_sigmoid_of_the_head_on_features(source: nn.Module) -> None:
    discriminator = Discriminator(32)
    with torch.no_grad():
        discriminator.head.weight.copy_(torch.linspace(-1, 1, 32)[None])
        discriminator.head.bias.fill_(0.3)
    ids = task_samples(4, seed=2)
    expected = torch.sigmoid(sequence_features(source, ids) @ torch.linspace(-1, 1, 32) + 0.3)
    assert torch.allclose(discriminator.scorer(source)(ids), expected)


def test_fitted_discriminator_filters_fresh_samples_toward_the_task(source: nn.Module) -> None:
    real = task_samples(8, seed=1)
    synthetic = synthesize(source, real, 64, 14)
    score = fit_discriminator(source, real, synthetic).scorer(source)
    assert score(real).mean() > score(synthetic).mean() + 0.1
    fresh = synthesize(source, real, 64, 14, seed=4)  # samples the discriminator never saw
    kept_rows, dropped = filter_synthetic(fresh, score), fresh[score(fresh) < 0.5]
    assert 0 < kept_rows.shape[0] < 64
    assert task_likelihood(kept_rows[:, 2:]) > task_likelihood(dropped[:, 2:]) + 0.15


def test_kl_to_teacher_matches_the_definition(source: nn.Module) -> None:
    ids = task_samples(4, seed=2)
    other = tiny_gpt2()
    with torch.no_grad():
        p, q = (m(input_ids=ids).logits.log_softmax(-1) for m in (source, other))
        manual = (p.exp() * (p - q)).sum(-1).mean()
        assert kl_to_teacher(source, other, ids).item() == pytest.approx(manual.item(), rel=1e-5)
        twin = attach_adapter(tiny_llama(), LORA, adapter_tensors(source, "src"), "src", "test")
        assert kl_to_teacher(source, twin, ids).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_fits_an_input_dependent_teacher_and_trains_only_the_adapter() -> None:
    teacher = lorakit.adapt(tiny_llama(), LORA.replace(init="random"), "src")
    perturb(teacher, 0.3)  # outputs depend on the input: each row's targets must stay with that row
    data = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    target = student(tiny_llama, LORA.targets)
    lorakit.adapt(target, LORA, "other", activate=False)
    frozen = {k: v.clone() for k, v in target.state_dict().items() if ".dst." not in k}
    with torch.no_grad():
        before = kl_to_teacher(teacher, target, data).item()
    losses = distill(teacher, target, "dst", data, steps=150, batch_size=8)
    with torch.no_grad():
        after = kl_to_teacher(teacher, target, data).item()
    assert len(losses) == 150 and after < 0.3 * before
    assert lorakit.active_adapters(target) == ["dst"]
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in frozen.items())  # base and "other" untouched


def test_distillation_on_the_same_base_recovers_the_teacher(source: nn.Module, kept: Tensor) -> None:
    target = student(tiny_llama, LORA.targets)
    held_out = task_samples(16, seed=3)
    with torch.no_grad():
        before = kl_to_teacher(source, target, held_out).item()
    losses = distill(source, target, "dst", kept, steps=200)
    with torch.no_grad():
        after = kl_to_teacher(source, target, held_out).item()
    assert before > 1.0 and after < 0.1 * before
    assert losses[-1] < 0.01 * losses[0]


def test_distillation_to_another_family_lowers_the_kl(source: nn.Module, kept: Tensor) -> None:
    target = student(tiny_gpt2, ["c_attn", "c_proj", "lm_head"])
    held_out = task_samples(16, seed=3)
    teacher_before = flatten_adapter(source, "src")[0]
    with torch.no_grad():
        before = kl_to_teacher(source, target, held_out).item()
    distill(source, target, "dst", kept, steps=200)
    with torch.no_grad():
        after = kl_to_teacher(source, target, held_out).item()
    assert after < 0.2 * before
    assert torch.equal(flatten_adapter(source, "src")[0], teacher_before)  # the teacher never trains


def test_trans_lora_refuses_bad_inputs(source: nn.Module, kept: Tensor) -> None:
    cfg = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    small_vocab = lorakit.adapt(LlamaForCausalLM(cfg), LORA, "dst")
    with pytest.raises(ConfigError):
        distill(source, small_vocab, "dst", kept % 80, steps=1)
    with pytest.raises(ConfigError):
        kl_to_teacher(source, small_vocab, kept % 80)
    target = student(tiny_llama, LORA.targets)
    with pytest.raises(ConfigError):  # the filter kept nothing
        distill(source, target, "dst", kept[:0], steps=1)
    with pytest.raises(ConfigError):
        distill(source, source, "src", kept, steps=1)
    with pytest.raises(LorakitError):
        distill(source, target, "missing", kept, steps=1)
    with pytest.raises(LorakitError):
        kl_to_teacher(source, nn.Linear(2, 2), kept)
    with pytest.raises(ConfigError):
        synthesize(source, kept, 4, 4, temperature=0.0)
    with pytest.raises(ConfigError):
        synthesize(source, kept, 4, 4, prefix=kept.shape[1] + 1)
    with pytest.raises(ConfigError):
        fit_discriminator(source, kept[:0], kept)
