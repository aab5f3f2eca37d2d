"""Trans-LoRA (METHODS.md entry 50): synthetic samples from the source base + adapter, a discriminator filter, and
distillation onto a new base (the same base, or another family with the same vocabulary)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from test_generate_icm import LORA, VOCAB
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from zoo import perturb, tiny_gpt2, tiny_llama

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.generate.icm_lora import flatten_adapter, sequence_features
from lorakit.generate.trans_lora import (
    Discriminator,
    distill,
    filter_synthetic,
    fit_discriminator,
    kl_to_teacher,
    synthesize,
)
from lorakit.io.adapter_files import adapter_tensors, attach_adapter


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
