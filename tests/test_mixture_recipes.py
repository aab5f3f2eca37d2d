"""Gated mixtures of LoRA experts from files: MeteoRA (many PEFT adapters under a top-2 gate) and LoRA-Mixer (routed
attention / SSM projections + SBL); MTLoRA and RecLoRA are in test_mixture_rows.py. Each property is checked against a
reference computed another way (row-by-row runs, hooks, explicit formulas)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from test_mixtures import randomize
from transformers import MambaConfig, MambaForCausalLM
from zoo import tiny_llama

import lorakit
from lorakit.errors import LorakitError
from lorakit.hosts.host import hosts
from lorakit.mixtures.files import load_mixture, save_mixture
from lorakit.mixtures.hooks import RouterLosses
from lorakit.mixtures.lora_mixer import MixerRouter, SpecializationBalanceLoss, add_mixer, load_mixer
from lorakit.mixtures.meteora import gate_accuracy, load_meteora

G = torch.Generator().manual_seed(7)
IDS4 = torch.randint(0, 96, (4, 6), generator=G)
USERS = torch.randn(4, 5, generator=G)


def task_ids(labels, length=6, seed=0):
    """Rows whose tokens come from task ``t``'s third of the vocabulary (ids ``[32 t, 32 t + 32)``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(32 * t, 32 * t + 32, (length,), generator=g) for t in labels])


def ruled_llama():
    """A tiny Llama whose embeddings of task ``t``'s tokens carry +10 on hidden channel ``t``: every normalised
    residual input (q/v/up projections) says which task its row is."""
    model = tiny_llama(0)
    with torch.no_grad():
        for t in range(3):
            model.model.embed_tokens.weight[32 * t:32 * t + 32, t] += 10.0
    return model


def route_by_rule(router, scale=100.0):
    """Gate ``l`` reads channel ``t`` for expert ``t``: each token goes (one-hot, after underflow) to its task."""
    with torch.no_grad():
        for gate in router.gates.values():
            gate.weight.zero_()
            gate.weight[:, :3].copy_(scale * torch.eye(3))


def peft_folders(root, targets, count, seed):
    """``count`` PEFT LoRA folders: the first saved by PEFT, the others with the same config and seeded tensors."""
    peft_model = get_peft_model(tiny_llama(0), PeftLoraConfig(r=2, lora_alpha=2, target_modules=targets,
                                                              init_lora_weights=False))
    peft_model.save_pretrained(root / "f0")
    keys = load_file(root / "f0" / "adapter_model.safetensors")
    dirs = {}
    for i in range(count):
        folder = root / f"f{i}"
        if i:
            shutil.copytree(root / "f0", folder)
        g = torch.Generator().manual_seed(seed + i)
        save_file({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in keys.items()},
                  folder / "adapter_model.safetensors")
        dirs[f"e{i}"] = str(folder)
    return dirs


@pytest.fixture(scope="module")
def ffn_experts(tmp_path_factory):
    return peft_folders(tmp_path_factory.mktemp("meteora"), ["q_proj", "v_proj", "up_proj"], 3, 100)


@pytest.fixture(scope="module")
def attention_experts(tmp_path_factory):
    return peft_folders(tmp_path_factory.mktemp("mixer"), ["q_proj", "v_proj", "o_proj"], 3, 200)


def expert_tensors(model, names):
    return {f"{h.path}.{n}.{k}": p.detach().clone() for h in hosts(model) for n in names if n in h.adapters
            for k, p in h.adapters[n].state_dict().items()}


def train(model, steps, params, loss_fn, lr=1e-2):
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad()


def train_router_only(model, names, router, router_name, hook) -> None:
    """Three steps on the router's tensors only, ``hook.forward_loss`` added; the experts must stay bit-identical."""
    params = lorakit.trainable_parameters(model)
    assert params and all(k.startswith(f"lorakit_routers.{router_name}.") for k in params)
    before = expert_tensors(model, names)
    model.train()

    def loss():
        with lorakit.mix(model, names, router):
            return model(IDS4, labels=IDS4).loss + hook.forward_loss(model)
    train(model, 3, params.values(), loss)
    after = expert_tensors(model, names)
    assert before and all(torch.equal(after[k], v) for k, v in before.items())


# -- MeteoRA -----------------------------------------------------------------------------------------------------------
LABELS = torch.tensor([2, 0, 1, 0])


def test_meteora_one_hot_gate_equals_each_rows_adapter_alone(ffn_experts):
    model = ruled_llama()
    names, gate = load_meteora(model, ffn_experts)
    route_by_rule(gate)
    ids = task_ids(LABELS.tolist())
    weights = []
    with torch.no_grad():
        with lorakit.mix(model, names, lambda path, x: weights.append(gate(path, x)) or weights[-1]):
            mixed = model(ids).logits
        assert len(weights) == 6 and all(torch.equal(w, F.one_hot(LABELS, 3).float()[:, None].expand_as(w))
                                         for w in weights)  # top-2 of a one-hot softmax: exactly one-hot
        with lorakit.route(model, [names[t] for t in LABELS]):  # row b: adapter LABELS[b] alone
            alone = model(ids).logits
        with lorakit.route(model, [names[0]] * 4):
            first = model(ids).logits
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    assert (mixed - first)[LABELS != 0].abs().max() > 1e-3  # the experts differ


def test_meteora_28_adapters_run_in_one_forward_each_expert_once_per_layer(tmp_path):
    model = tiny_llama(0)
    names, gate = load_meteora(model, peft_folders(tmp_path, ["q_proj", "v_proj"], 28, 0))
    randomize(gate.parameters(), std=1.0, seed=4)
    calls: dict[tuple[str, str], list[int]] = {}
    for host in hosts(model):
        for name, adapter in host.adapters.items():
            adapter.register_forward_hook(lambda m, args, out, key=(host.path, name):
                                          calls.setdefault(key, []).append(args[0].shape[0]))
    with torch.no_grad(), lorakit.mix(model, names, gate):
        sparse = model(IDS4).logits
    assert len(names) == 28 and len(gate.gates) == 4
    assert all(len(rows) == 1 for rows in calls.values())  # at most once per layer and forward
    for host in hosts(model):
        assert sum(calls.get((host.path, n), [0])[0] for n in names) == 2 * IDS4.numel()  # top-2 per token
    assert len({n for _, n in calls}) > 2
    with torch.no_grad(), lorakit.mix(model, names, gate, dispatch="dense"):
        torch.testing.assert_close(sparse, model(IDS4).logits, atol=1e-5, rtol=1e-5)


def test_meteora_gate_only_training_leaves_every_expert_bit_identical(ffn_experts):
    model = tiny_llama(0)
    names, gate = load_meteora(model, ffn_experts, balance=0.01)
    randomize(gate.parameters(), std=0.5, seed=5)
    start = [p.detach().clone() for p in gate.parameters()]
    train_router_only(model, names, gate, "meteora", RouterLosses())
    assert all(not torch.equal(a, b) for a, b in zip(gate.parameters(), start))


def test_meteora_gate_accuracy(ffn_experts):
    model = ruled_llama()
    names, gate = load_meteora(model, ffn_experts)
    route_by_rule(gate)
    batches = [task_ids(LABELS.tolist(), seed=1), task_ids([1, 2], seed=2)]
    perfect = gate_accuracy(model, names, gate, batches, [LABELS, [1, 2]])
    assert perfect["mean"] == 1.0 and len(perfect) == 7 and set(perfect.values()) == {1.0}
    randomize(gate.parameters(), std=1.0, seed=6)  # an untrained gate: measurable, not perfect
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding: not counted
    seen = {}
    handles = [h.register_forward_pre_hook(lambda m, args, path=h.path: seen.__setitem__(path, args[0]))
               for h in hosts(model)]
    got = gate_accuracy(model, names, gate, [{"input_ids": IDS4, "attention_mask": mask}], [LABELS])
    for handle in handles:
        handle.remove()
    keep = mask.bool()
    probs = {p: torch.softmax(gate.logits(p, x), -1) for p, x in seen.items()}
    expected = {p: float(((q.argmax(-1) == LABELS[:, None]) & keep).sum() / keep.sum()) for p, q in probs.items()}
    mean = torch.stack(list(probs.values())).mean(0).argmax(-1)
    expected["mean"] = float(((mean == LABELS[:, None]) & keep).sum() / keep.sum())
    assert got == pytest.approx(expected) and 0 < got["mean"] < 1
    with pytest.raises(LorakitError, match="one label tensor per batch"):
        gate_accuracy(model, names, gate, batches, [LABELS])


# -- LoRA-Mixer --------------------------------------------------------------------------------------------------------
def tiny_mamba():
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=96, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                        conv_kernel=4)).eval()


def test_mixer_hard_routes_each_token_of_mamba_in_and_out_projections():
    model = tiny_mamba()
    names, router = add_mixer(model, 3, lorakit.LoraConfig(r=2, targets=["in_proj", "out_proj"], init="random"))
    assert sorted(router.paths) == sorted(f"backbone.layers.{i}.mixer.{p}" for i in (0, 1)
                                          for p in ("in_proj", "out_proj"))
    randomize(router.parameters(), std=1.0, seed=7)
    seen = {}
    handles = [h.register_forward_hook(lambda m, args, out, h=h: seen.__setitem__(h.path, (args[0], out)))
               for h in hosts(model)]
    with torch.no_grad(), lorakit.mix(model, names, router):
        model(IDS4)
        for handle in handles:
            handle.remove()
        for host in hosts(model):  # reference: base + the delta of the argmax expert, chosen token by token
            x, out = seen[host.path]
            flat = x.reshape(-1, x.shape[-1])
            base = host.base_layer(flat)
            deltas = torch.stack([host.adapters[n](flat, base, host.backend) for n in names], 1)
            choice = router.logits(host.path, x).reshape(-1, 3).argmax(-1)
            assert len(choice.unique()) > 1
            expected = base + deltas[torch.arange(len(choice)), choice]
            torch.testing.assert_close(out.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)


def test_mixer_router_only_mode_from_files_leaves_experts_bit_identical(attention_experts, tmp_path):
    model = tiny_llama(0)
    names, router = load_mixer(model, attention_experts)
    assert isinstance(router, MixerRouter) and router.hard and len(router.gates) == 6
    sbl = SpecializationBalanceLoss(balance=0.1, alignment=0.1)
    sbl.set_labels(LABELS)
    train_router_only(model, names, router, "mixer", sbl)
    assert all(g.weight.abs().sum() > 0 for g in router.gates.values())
    model.eval()
    save_mixture(model, tmp_path / "mixer", "mixer", names)
    fresh = tiny_llama(0)
    mixture = load_mixture(fresh, tmp_path / "mixer")
    assert isinstance(lorakit.inject.routers(fresh)["mixer"], MixerRouter) and mixture.frozen
    with torch.no_grad():
        with lorakit.mix(model, names, router):
            expected = model(IDS4).logits
        with lorakit.mix(fresh, list(mixture.experts), lorakit.inject.routers(fresh)["mixer"]):
            torch.testing.assert_close(fresh(IDS4).logits, expected, atol=0, rtol=0)


def test_sbl_matches_its_formula_and_alignment_falls_with_router_training(attention_experts):
    model = tiny_llama(0)
    names, router = load_mixer(model, attention_experts)
    randomize(router.parameters(), std=0.3, seed=9)
    sbl = SpecializationBalanceLoss(balance=0.5, alignment=2.0)
    labels = torch.tensor([0, 1, 2, 1])
    ids = task_ids(labels.tolist(), seed=3)
    sbl.set_labels(labels)
    model.train()
    seen = {}
    handles = [h.register_forward_pre_hook(lambda m, args, path=h.path: seen.__setitem__(path, args[0]))
               for h in hosts(model)]
    with lorakit.mix(model, names, router):
        model(ids)
    total = sbl.forward_loss(model)
    for handle in handles:
        handle.remove()
    with torch.no_grad():  # reference: hard top-1 loads f, mean softmax P per layer; row means over tokens, layers
        probs = [torch.softmax(router.logits(p, x), -1) for p, x in seen.items()]
        balance = sum(3 * (F.one_hot(p.argmax(-1), 3).float().mean((0, 1)) * p.mean((0, 1))).sum()
                      for p in probs) / len(probs)
        row_mean = sum(p.mean(1) for p in probs) / len(probs)
        alignment = -row_mean[torch.arange(4), labels].log().mean()
    assert len(probs) == 6 and sbl.last["balance"] == pytest.approx(float(balance), rel=1e-5)
    assert sbl.last["alignment"] == pytest.approx(float(alignment), rel=1e-5)
    assert float(total.detach()) == pytest.approx(0.5 * float(balance) + 2.0 * float(alignment), rel=1e-5)
    history = []
    sbl = SpecializationBalanceLoss(balance=0.0, alignment=1.0)
    sbl.set_labels(labels)

    def loss():
        with lorakit.mix(model, names, router):
            model(ids)
        out = sbl.forward_loss(model)
        history.append(sbl.last["alignment"])
        return out
    train(model, 8, lorakit.trainable_parameters(model, "mixer").values(), loss, lr=0.05)
    assert history[-1] < 0.7 * history[0]
    with pytest.raises(LorakitError, match="3 labels for a batch of 4 rows"):
        sbl.set_labels(labels[:3])
        with lorakit.mix(model, names, router):
            model(ids)
        sbl.forward_loss(model)


def test_mixer_joint_mode_trains_experts_and_router():
    model = tiny_llama(0)
    names, router = add_mixer(model, 3, lorakit.LoraConfig(r=2, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
                              top_k=2)
    randomize(router.parameters(), std=0.5, seed=8)
    params = lorakit.trainable_parameters(model)
    start = {k: p.detach().clone() for k, p in params.items()}
    sbl = SpecializationBalanceLoss()
    sbl.set_labels(LABELS)
    model.train()

    def loss():
        with lorakit.mix(model, names, router):
            return model(IDS4, labels=IDS4).loss + sbl.forward_loss(model)
    train(model, 3, params.values(), loss)
    moved = {k for k, p in params.items() if not torch.equal(p, start[k])}
    assert any(k.startswith("lorakit_routers.mixer.") for k in moved)
    for name in names:  # each expert's A and B trained
        assert any(f".{name}.lora_A" in k for k in moved) and any(f".{name}.lora_B" in k for k in moved), name


def test_mixer_refuses_experts_off_the_attention_projections(ffn_experts):
    model = tiny_llama(0)
    with pytest.raises(LorakitError, match=r"routes only the projections .*up_proj"):
        load_mixer(model, ffn_experts)
    assert not lorakit.configs(model) and not list(hosts(model))  # nothing left behind
    with pytest.raises(LorakitError, match="no attention projections"):
        add_mixer(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)
