"""DP-SGD for LoRA clients: exact per-sample gradients, Opacus clipping + noise, and the RDP ledger."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.errors import ConfigError
from lorakit.federated.privacy import PrivacyConfig, PrivacyLedger, PrivateSteps, per_sample_gradients
from lorakit.train.tasks import IGNORE, CausalLMTask, Example, Sums

VOCAB = 64


def adapted_llama(config_cls: type = lorakit.LoraConfig) -> tuple[LlamaForCausalLM, dict[str, nn.Parameter]]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    lorakit.adapt(model, config_cls(r=4, targets="all-linear", init="random"), "default")
    return model, lorakit.trainable_parameters(model, "default")


def task() -> CausalLMTask:
    return CausalLMTask(SimpleNamespace(pad_token_id=0, eos_token_id=1), max_length=16)


def examples() -> list[Example]:
    """Different lengths (so the batch pads) and a prompt masked out of the labels (weight < length - 1)."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 6)]
    return [Example(ids[0], labels=list(ids[0])), Example(ids[1], labels=[IGNORE] * 4 + ids[1][4:]),
            Example(ids[2], labels=list(ids[2]))]


def reference_gradients(model: nn.Module, params: dict[str, nn.Parameter],
                        batch: list[Example]) -> list[list[torch.Tensor]]:
    """Each example alone, unpadded: gradient of its mean next-token loss."""
    out = []
    for e in batch:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=IGNORE)
        out.append([g.detach() for g in torch.autograd.grad(loss, list(params.values()))])
    return out


def test_per_sample_gradients_are_exact_and_touch_only_the_adapter() -> None:
    model, params = adapted_llama()
    batch = examples()
    losses = per_sample_gradients(model, params, task(), batch)
    expected = reference_gradients(model, params, batch)
    for k, p in enumerate(params.values()):
        assert p.grad is None and p.grad_sample.shape == (len(batch), *p.shape)
        for i in range(len(batch)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][k], atol=1e-5, rtol=1e-5)
    assert any(p.grad_sample.abs().sum() > 0 for p in params.values())
    trained = {id(p) for p in params.values()}
    for p in model.parameters():
        if id(p) not in trained:
            assert getattr(p, "grad_sample", None) is None and p.grad is None
    # the padded batch's gradient of the mean of per-example mean losses is the mean of the rows
    collated = task().collate(batch)
    logits = model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"],
                   position_ids=collated["position_ids"]).logits[:, :-1]
    terms = F.cross_entropy(logits.transpose(1, 2), collated["labels"][:, 1:], ignore_index=IGNORE, reduction="none")
    per_example = terms.sum(1) / torch.tensor([e.weight for e in batch])
    assert losses == pytest.approx(per_example.tolist(), rel=1e-5)
    for p, g in zip(params.values(), torch.autograd.grad(per_example.mean(), list(params.values()))):
        torch.testing.assert_close(p.grad_sample.mean(0), g, atol=1e-5, rtol=1e-5)


def test_noiseless_step_is_the_mean_of_jointly_clipped_gradients() -> None:
    model, params = adapted_llama()
    batch = examples()
    grads = reference_gradients(model, params, batch)
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gs)) for gs in grads])
    clip = float(norms.median())  # one example is clipped, one is not
    before = [p.detach().clone() for p in params.values()]
    steps = PrivateSteps(torch.optim.SGD(params.values(), lr=1.0), params,
                         PrivacyConfig(noise_multiplier=0.0, max_grad_norm=clip), 0.0, batch_size=len(batch))
    steps.step(model, task(), batch)
    factors = [min(1.0, clip / float(n)) for n in norms]
    for k, (p, old) in enumerate(zip(params.values(), before)):
        expected = -sum(f * gs[k] for f, gs in zip(factors, grads)) / len(batch)
        torch.testing.assert_close(p.detach() - old, expected, atol=1e-7, rtol=1e-4)
        assert p.grad is None and p.grad_sample is None


class ZeroTask:
    """A task whose loss has zero gradient everywhere, so a step applies only the noise."""

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(1)}

    def loss_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Sums:
        return Sums(model.weight.sum() * 0.0, 1)


def noise_step(seed: int | None, sigma: float = 2.0, clip: float = 0.5, batch_size: int = 4) -> torch.Tensor:
    model = nn.Linear(200, 100, bias=False)
    nn.init.zeros_(model.weight)
    params = {"weight": model.weight}
    steps = PrivateSteps(torch.optim.SGD([model.weight], lr=1.0), params,
                         PrivacyConfig(noise_multiplier=sigma, max_grad_norm=clip), sigma, batch_size, seed=seed)
    loss = steps.step(model, ZeroTask(), [Example([2, 3], labels=[2, 3])] * batch_size)
    assert loss == 0.0
    return model.weight.detach().clone()


def test_noise_has_std_sigma_c_over_batch_size_and_is_seeded() -> None:
    change = noise_step(seed=3)
    assert float(change.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.1)
    assert abs(float(change.mean())) < 0.01
    assert torch.equal(change, noise_step(seed=3))
    assert not torch.equal(change, noise_step(seed=4))


def test_ffa_trains_and_noises_only_b() -> None:
    model, params = adapted_llama(lorakit.LoraFAConfig)
    assert params and all(name.endswith("lora_B.weight") for name in params)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" not in n}
    b_before = {n: p.detach().clone() for n, p in params.items()}
    per_sample_gradients(model, params, task(), examples())
    assert all(getattr(p, "grad_sample", None) is None for n, p in model.named_parameters() if "lora_B" not in n)
    steps = PrivateSteps(torch.optim.SGD(params.values(), lr=1.0), params,
                         PrivacyConfig(noise_multiplier=100.0, max_grad_norm=1e-6), 100.0, batch_size=3, seed=0)
    steps.step(model, task(), examples())
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    # every B moved by the noise (std 100 * 1e-6 / 3), which dwarfs the clipped gradients (norm <= 1e-6)
    change = torch.cat([(p.detach() - b_before[n]).flatten() for n, p in params.items()])
    assert float(change.std()) == pytest.approx(100 * 1e-6 / 3, rel=0.15)


def test_ledger_matches_opacus_and_round_trips() -> None:
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(1.0, 0.01, 100)
    first = ledger.epsilon(1e-5)
    ledger.record(1.0, 0.01, 100)
    assert ledger.epsilon(1e-5) > first and ledger.to_list() == [(1.0, 0.01, 200)]
    ledger.record(2.0, 0.02, 50)
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.01, 200), (2.0, 0.02, 50)]
    assert ledger.epsilon(1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
    restored = PrivacyLedger.from_list([list(t) for t in ledger.to_list()])  # as after a JSON round trip
    assert restored.to_list() == ledger.to_list() and restored.epsilon(1e-5) == ledger.epsilon(1e-5)
    quieter = PrivacyLedger.from_list([(2.0, 0.01, 200)])
    louder = PrivacyLedger.from_list([(1.0, 0.01, 200)])
    assert quieter.epsilon(1e-5) < louder.epsilon(1e-5)


def test_target_epsilon_resolves_to_a_sigma_within_budget() -> None:
    config = PrivacyConfig(target_epsilon=8.0, delta=1e-5)
    sigma = config.resolve(sample_rate=0.05, steps=300)
    ledger = PrivacyLedger.from_list([(sigma, 0.05, 300)])
    assert 7.5 <= ledger.epsilon(1e-5) <= 8.0
    assert PrivacyConfig(noise_multiplier=1.3).resolve(0.05, 300) == 1.3


@pytest.mark.parametrize("kwargs, field", [
    ({}, "noise_multiplier"),
    ({"noise_multiplier": 1.0, "target_epsilon": 8.0}, "noise_multiplier"),
    ({"noise_multiplier": -0.5}, "noise_multiplier"),
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
    ({"noise_multiplier": 1.0, "delta": 1.0}, "delta"),
    ({"noise_multiplier": 1.0, "delta": 0.0}, "delta"),
])
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        PrivacyConfig(**kwargs)


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ConfigError, match="sample_rate"):
        PrivacyConfig(target_epsilon=8.0).resolve(sample_rate=0.0, steps=10)
    with pytest.raises(ConfigError, match="steps"):
        PrivacyLedger().record(1.0, 0.1, -1)
    model, params = adapted_llama()
    with pytest.raises(ConfigError, match="batch_size"):
        PrivateSteps(torch.optim.SGD(params.values(), lr=1.0), params, PrivacyConfig(noise_multiplier=1.0), 1.0, 0)
    with pytest.raises(ConfigError, match="optimizer"):
        PrivateSteps(torch.optim.SGD(list(params.values())[:1], lr=1.0), params, PrivacyConfig(noise_multiplier=1.0),
                     1.0, 4)
