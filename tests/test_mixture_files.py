"""X-LoRA against PEFT's XLoraModel, experts loaded from PEFT folders, router-only training, whole mixtures saved
and reloaded."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, XLoraConfig, get_peft_model
from test_mixtures import FFN, IDS, moe, randomize
from zoo import tiny_llama

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.hosts.host import hosts
from lorakit.mixtures.files import load_experts, load_mixture, save_mixture
from lorakit.mixtures.xlora import attach_xlora, xlora_forward, xlora_head

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    """Three PEFT LoRA folders on the tiny Llama, named "0", "1", "2" (PEFT's X-LoRA loads experts by index)."""
    root = tmp_path_factory.mktemp("experts")
    dirs = {}
    for i in range(3):
        peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                               init_lora_weights=False))
        randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=10 + i)
        peft_model.save_pretrained(root / str(i))
        dirs[str(i)] = str(root / str(i))
    return dirs


def with_experts(dirs):
    model = tiny_llama(0)
    names = load_experts(model, {f"e{k}": d for k, d in dirs.items()})
    return model, names


def test_xlora_equals_peft_xlora_model(expert_dirs):
    base = tiny_llama(0)
    base.config.use_cache = False
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=expert_dirs, layerwise_scalings=True,
                         xlora_depth=2, xlora_size=16, top_k_lora=2, enable_softmax_topk=True)
    theirs = get_peft_model(base, config).eval()
    classifier = theirs.base_model.internal_xlora_classifier
    randomize(classifier.parameters(), std=1.0)
    model, names = with_experts(expert_dirs)
    head = xlora_head(model, names, layerwise=True, depth=2, size=16, top_k=2, softmax_topk=True)
    head.load_peft_state(classifier.state_dict())
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        got = xlora_forward(model, head, input_ids=IDS).logits
        base_logits = tiny_llama(0)(IDS).logits
    assert (got - base_logits).abs().max() > 1e-2  # the experts act
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_xlora_one_hot_scalings_give_that_expert_and_zero_scalings_the_base(expert_dirs):
    model, names = with_experts(expert_dirs)
    head = xlora_head(model, names, softmax=False)
    last = head.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
        one_hot = xlora_forward(model, head, input_ids=IDS).logits
        lorakit.set_active(model, "e1")
        torch.testing.assert_close(one_hot, model(IDS).logits, atol=1e-5, rtol=1e-5)
        last.bias.zero_()
        with lorakit.disable(model):
            base_logits = model(IDS).logits
        torch.testing.assert_close(xlora_forward(model, head, input_ids=IDS).logits, base_logits)


def test_router_only_training_leaves_experts_bit_identical(expert_dirs):
    model, names = with_experts(expert_dirs)
    head = lorakit.add_router(model, "xlora", xlora_head(model, names, layerwise=True))
    experts = {f"{h.path}.{n}.{k}": p for h in hosts(model) for n in names if n in h.adapters
               for k, p in h.adapters[n].state_dict().items()}
    assert experts and not any(k.startswith(tuple(names)) for k in lorakit.trainable_parameters(model))
    experts = {k: p.clone() for k, p in experts.items()}
    before = [p.detach().clone() for p in head.parameters()]
    optimizer = torch.optim.AdamW(lorakit.trainable_parameters(model, "xlora").values(), lr=1e-2)
    for _ in range(2):
        xlora_forward(model, head, input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {f"{h.path}.{n}.{k}": p for h in hosts(model) for n in names if n in h.adapters
             for k, p in h.adapters[n].named_parameters()}
    assert all(torch.equal(after[k], v) and not after[k].requires_grad for k, v in experts.items())
    assert any(not torch.equal(a, b) for a, b in zip(head.parameters(), before))


def test_xlora_mixture_saves_and_reloads_to_identical_outputs(expert_dirs, tmp_path):
    model, names = with_experts(expert_dirs)
    head = lorakit.add_router(model, "xlora", xlora_head(model, names, layerwise=True, top_k=2))
    randomize(head.parameters(), std=1.0)
    with torch.no_grad():
        expected = xlora_forward(model, head, input_ids=IDS).logits
    save_mixture(model, tmp_path / "mix", "xlora", names)
    fresh = tiny_llama(0)
    mixture = load_mixture(fresh, tmp_path / "mix")
    assert mixture.experts == tuple(names) and mixture.frozen
    with torch.no_grad():
        got = xlora_forward(fresh, lorakit.inject.routers(fresh)["xlora"], input_ids=IDS)
    torch.testing.assert_close(got.logits, expected, atol=0, rtol=0)


def test_expert_block_mixture_saves_and_reloads_to_identical_outputs(tmp_path):
    model, _ = moe(experts={"model.layers.0.mlp": 2, "model.layers.1.mlp": 3}, k=2)
    with torch.no_grad():
        expected = model(IDS).logits
    save_mixture(model, tmp_path / "moe", "moe")
    for name in ("moe_0", "moe_2"):  # each expert is a plain PEFT LoRA of the stock model
        assert json.loads((tmp_path / "moe" / "experts" / name / "adapter_config.json").read_text())[
            "peft_type"] == "LORA"
    fresh = tiny_llama(0)
    mixture = load_mixture(fresh, tmp_path / "moe")
    assert mixture.blocks == "mlp" and not mixture.frozen
    assert len(fresh.model.layers[0].mlp.experts) == 2 and len(fresh.model.layers[1].mlp.experts) == 3
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected, atol=0, rtol=0)


def test_bad_mixture_folders_are_refused(tmp_path):
    model, _ = moe(experts=2, k=1)
    save_mixture(model, tmp_path / "m", "moe")
    meta = json.loads((tmp_path / "m" / "mixture.json").read_text())
    for bad in ({**meta, "experts": ["../evil"]}, {**meta, "format": "other"}, {**meta, "blocks": "a.b"}):
        (tmp_path / "m" / "mixture.json").write_text(json.dumps(bad))
        with pytest.raises(AdapterFileError, match="mixture.json"):
            load_mixture(tiny_llama(0), tmp_path / "m")
    with pytest.raises(lorakit.LorakitError, match="identifier"):
        load_experts(tiny_llama(0), {"a-b": str(tmp_path)})
    assert FFN


def test_attached_xlora_makes_every_model_call_two_pass(expert_dirs):
    model, names = with_experts(expert_dirs)
    head = lorakit.add_router(model, "xlora", xlora_head(model, names, layerwise=True, top_k=2))
    randomize(head.parameters(), std=1.0)
    with torch.no_grad():
        expected = xlora_forward(model, head, input_ids=IDS).logits
        detach = attach_xlora(model, head)
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=0, rtol=0)
        generated = model.generate(input_ids=IDS[:1, :3], max_new_tokens=2, do_sample=False, use_cache=False)
        assert generated.shape == (1, 5)
        with pytest.raises(lorakit.LorakitError, match="KV cache"):
            model.generate(input_ids=IDS[:1, :3], max_new_tokens=2, do_sample=False, use_cache=True)
        detach()
        lorakit.set_active(model, [])
        with lorakit.disable(model):
            base_logits = model(IDS).logits
        torch.testing.assert_close(model(input_ids=IDS).logits, base_logits)  # detached: plain model again
