"""Merging on the updates: ``cat`` is exact for any ranks and methods, ``svd`` at full rank is ``cat``, TIES / DARE /
magnitude pruning equal dense references written here, extraction recovers a planted low-rank difference, PEFT loads
every merged adapter with equal logits, and bad requests get clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from zoo import tiny_gpt2, tiny_llama

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.hosts.host import adapters_named, hosts
from lorakit.merging.extract import extract_lora
from lorakit.merging.model import merge_adapters
from lorakit.merging.rules import MERGE_RULES, apply_rule

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
NAMES, WEIGHTS = ["a", "b", "d"], [0.7, -0.4, 0.5]


def bank(seed: int = 0) -> torch.nn.Module:
    """LoRAs of ranks 2 and 4 on all linear layers and a DoRA (not factorable) on q/v."""
    model = tiny_llama(seed)
    torch.manual_seed(seed)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets="all-linear", init="random"), "a", activate=False)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", init="random"), "b", activate=False)
    lorakit.adapt(model, lorakit.DoraConfig(r=2, targets=["q_proj", "v_proj"], init="random"), "d", activate=False)
    return model


def weighted_sum(host, names=NAMES, weights=WEIGHTS) -> torch.Tensor:
    return sum(w * host.adapters[n].delta_weight(host.backend).float() for n, w in zip(names, weights)
               if n in host.adapters)


def test_cat_is_the_weighted_sum_of_the_updates_for_any_ranks_and_methods():
    model = bank()
    report = merge_adapters(model, NAMES, WEIGHTS, rule="cat", into="m", activate=True)
    for host, merged in adapters_named(model, "m"):
        torch.testing.assert_close(merged.delta_weight(host.backend), weighted_sum(host), atol=1e-5, rtol=1e-5)
    assert report.worst_sum_error < 1e-6 and report.ranks["model.layers.0.mlp.up_proj"] == 6
    with torch.no_grad():
        merged_logits = model(IDS).logits
        with lorakit.mix(model, NAMES, torch.tensor(WEIGHTS)):
            torch.testing.assert_close(merged_logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "svd"])
def test_linear_and_svd_at_full_rank_equal_cat_and_svd_truncates_optimally(rule):
    model = bank()
    merge_adapters(model, NAMES, WEIGHTS, rule="cat", into="cat")
    merge_adapters(model, NAMES, WEIGHTS, rule=rule, into="full")
    report = merge_adapters(model, NAMES, WEIGHTS, rule=rule, into="r3", rank=3)
    for host in hosts(model):
        cat = host.adapters["cat"].delta_weight(host.backend)
        torch.testing.assert_close(host.adapters["full"].delta_weight(host.backend), cat, atol=1e-5, rtol=1e-5)
        s = torch.linalg.svdvals(cat)
        best = float((s[3:] ** 2).sum().sqrt() / (s**2).sum().sqrt())  # Eckart-Young
        assert report.sum_error[host.path] == pytest.approx(best, rel=1e-3, abs=1e-6)


def ties_reference(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-Merging written entry by entry: trim each task vector, elect signs by mass, disjoint mean."""
    trimmed = []
    for delta, w in zip(deltas, weights):
        v = (w * delta).flatten()
        k = int(torch.tensor(density * v.numel()).ceil())
        keep = set(v.abs().argsort(descending=True)[:k].tolist())
        trimmed.append([float(v[i]) if i in keep else 0.0 for i in range(v.numel())])
    out = []
    for entry in zip(*trimmed):
        total = sum(entry)
        sign = (total > 0) - (total < 0)
        agreeing = [x for x in entry if x != 0 and ((x > 0) - (x < 0)) == sign]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out).reshape(deltas[0].shape)


def test_ties_dare_and_magnitude_pruning_equal_dense_references():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = [0.5, 1.0, -0.7]
    torch.testing.assert_close(apply_rule("ties", deltas, weights, density=0.4), ties_reference(deltas, weights, 0.4))
    pruned = sum(w * d * (d.abs() >= d.abs().flatten().sort(descending=True).values[11]) for d, w in
                 zip(deltas, weights))  # 40% of 30 entries: the 12 largest of each
    torch.testing.assert_close(apply_rule("magnitude_prune", deltas, weights, density=0.4), pruned)
    dare = apply_rule("dare_linear", deltas, weights, density=0.5, seed=3)
    rng = torch.Generator().manual_seed(3)
    masks = [(torch.rand(d.shape, generator=rng) < 0.5) for d in deltas]
    torch.testing.assert_close(dare, sum(w * d * m / 0.5 for d, w, m in zip(deltas, weights, masks)))
    dare_ties = apply_rule("dare_ties", deltas, weights, density=0.5, seed=3)
    torch.testing.assert_close(dare_ties, ties_reference([d * m / 0.5 for d, m in zip(deltas, masks)], weights, 1.0))


def test_peft_loads_every_merged_adapter_with_equal_logits(tmp_path):
    model = bank()
    for rule in MERGE_RULES.names():
        merge_adapters(model, NAMES, WEIGHTS, rule=rule, into=rule, rank=None if rule == "cat" else 5)
        lorakit.save_adapter(model, tmp_path / rule, rule)
        lorakit.set_active(model, rule)
        with torch.no_grad():
            expected = model(IDS).logits
            theirs = PeftModel.from_pretrained(tiny_llama(0), tmp_path / rule).eval()
            torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_extraction_recovers_a_planted_low_rank_difference(tmp_path):
    base, tuned = tiny_llama(0), tiny_llama(0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("q_proj", "down_proj"):
            layer = getattr(tuned.model.layers[1].self_attn if name == "q_proj" else tuned.model.layers[1].mlp, name)
            layer.weight += torch.randn(layer.weight.shape[0], 3, generator=g) @ torch.randn(3, layer.weight.shape[1],
                                                                                              generator=g) * 0.1
        tuned.model.norm.weight += 0.01
    report = extract_lora(tuned, base, rank=3)
    assert set(report.ranks) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert max(report.errors.values()) < 1e-5 and report.other_differences == ["model.norm.weight"]
    with torch.no_grad():
        tuned.model.norm.weight -= 0.01
        torch.testing.assert_close(base(IDS).logits, tuned(IDS).logits, atol=1e-4, rtol=1e-4)
    lorakit.save_adapter(base, tmp_path / "x")
    fresh = tiny_llama(0)
    lorakit.load_adapter(fresh, tmp_path / "x")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, tuned(IDS).logits, atol=1e-4, rtol=1e-4)
    truncated = extract_lora(copy.deepcopy(tuned), tiny_llama(0), rank=1)
    assert min(truncated.errors.values()) > 0.1  # rank 1 of a rank-3 difference: the error is reported


def test_bad_merges_are_refused():
    model = bank()
    with pytest.raises(LorakitError, match="unknown"):
        merge_adapters(model, ["a", "zzz"])
    with pytest.raises(ConfigError, match="weights"):
        merge_adapters(model, ["a", "b"], [1.0, float("nan")])
    with pytest.raises(ConfigError, match="one weight per adapter"):
        merge_adapters(model, ["a", "b"], [1.0])
    with pytest.raises(LorakitError, match="merge rule"):
        merge_adapters(model, ["a", "b"], rule="average")
    with pytest.raises(LorakitError, match="no option"):
        merge_adapters(model, ["a", "b"], rule="cat", density=0.3)
    with pytest.raises(ConfigError, match="density"):
        merge_adapters(model, ["a", "b"], rule="ties", density=0.0)
    with pytest.raises(LorakitError, match="already exists"):
        merge_adapters(model, ["a", "b"], into="a")
    with pytest.raises(LorakitError, match="one shape"):
        apply_rule("linear", [torch.zeros(3, 4), torch.zeros(4, 3)], [1.0, 1.0])
    with pytest.raises(LorakitError, match="counterpart"):
        extract_lora(tiny_gpt2(), tiny_llama(0), rank=2)


def test_merge_and_extract_command_lines(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli import main

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()

    source, ids = load(), torch.randint(0, 20, (1, 6))
    for name, r in (("a", 2), ("b", 3)):
        lorakit.adapt(source, lorakit.LoraConfig(r=r, targets=["q_proj", "up_proj"], init="random"), name)
        lorakit.save_adapter(source, tmp_path / name, name)
    args = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.6", "0.4", "--model", str(model_dir),
            "--output", str(tmp_path / "m")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("to the weighted sum of the updates ")[1].split(";")[0]) < 1e-6
    merged = PeftModel.from_pretrained(load(), tmp_path / "m").eval()
    with torch.no_grad(), lorakit.mix(source, ["a", "b"], torch.tensor([0.6, 0.4])):
        torch.testing.assert_close(merged(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)

    tuned = load()
    with torch.no_grad():
        layer = tuned.model.layers[0].mlp.down_proj
        layer.weight += 0.05 * torch.ones(layer.weight.shape[0], 1) @ torch.ones(1, layer.weight.shape[1])
    tuned.save_pretrained(tmp_path / "full")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "full")  # as `finetune --method full` saves
    args = ["extract", "--model", str(tmp_path / "full"), "--base", str(model_dir), "--rank", "1", "--output",
            str(tmp_path / "x")]
    assert main(args) == 0 and "extracted a LoRA of 1 layers" in capsys.readouterr().out
    extracted = PeftModel.from_pretrained(load(), tmp_path / "x").eval()
    with torch.no_grad():
        torch.testing.assert_close(extracted(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)


def test_lego_rule_merges_a_model_s_adapters_and_is_exact_with_every_unit():
    model = bank()
    names, weights = ["a", "b"], [0.5, 0.5]
    report = merge_adapters(model, names, weights, rule="lego", into="all", units=6, reweight="none")
    assert report.worst_sum_error < 1e-5  # 2 + 4 units clustered into 6: the concatenation
    report = merge_adapters(model, names, weights, rule="lego", into="few", units=2)
    assert set(report.ranks.values()) == {2} and 0 < report.worst_sum_error < 1


def test_a_merge_folds_into_a_quantised_base_with_its_rounding_error_reported():
    model = bank()
    lorakit.quantize(model, "int8", "lorakit", block=32)
    merge_adapters(model, ["a", "b"], [0.5, 0.5], into="m", activate=True)
    with torch.no_grad():
        unmerged = model(IDS).logits
        lorakit.merge(model, "m")  # requantises W + delta
        errors = lorakit.rounding_errors(model)
        assert errors and 0 < max(errors.values()) < 0.02
        drift = float(torch.linalg.norm(model(IDS).logits - unmerged) / torch.linalg.norm(unmerged))
        assert 0 < drift < 0.1  # int8 rounding of W + delta, nothing else


def test_the_merging_package_leaves_lorakit_merge_the_function():
    import lorakit.merging  # noqa: F401  (a subpackage named `merge` would replace the attribute)

    assert callable(lorakit.merge) and lorakit.merge.__module__ == "lorakit.inject"
