"""Mixtures weighted per row: MTLoRA (a shared adapter plus one per task) and RecLoRA (user-routed meta-LoRAs), each
row checked against a reference computed another way (row-by-row runs, explicit merged LoRAs)."""
from __future__ import annotations

import pytest
import torch
from test_mixture_recipes import IDS4, USERS, expert_tensors, train
from test_mixtures import randomize
from zoo import tiny_llama

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.hosts.host import hosts
from lorakit.io.routers import load_router, save_router
from lorakit.mixtures.files import freeze
from lorakit.mixtures.multitask import add_tasks, tasks
from lorakit.mixtures.personal import UserRouter, add_bank, personalize

# -- MTLoRA ------------------------------------------------------------------------------------------------------------
TASKS = ["t0", "t1", "t2"]


def mtlora():
    model = tiny_llama(0)
    add_tasks(model, lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj", "down_proj"]), TASKS,
              task_config=lorakit.LoraConfig(r=2, targets=["v_proj", "down_proj"]))  # q_proj: shared only
    randomize(lorakit.trainable_parameters(model).values(), seed=1)
    return model


def test_mtlora_each_row_equals_shared_plus_its_task_adapter():
    model = mtlora()
    rows = ["t1", "t0", "t2", "t1"]
    with torch.no_grad():
        with tasks(model, "shared", TASKS, rows):
            mixed = model(IDS4).logits
        for b, task in enumerate(rows):
            lorakit.set_active(model, ["shared", task])
            torch.testing.assert_close(mixed[b], model(IDS4[b:b + 1]).logits[0], atol=1e-5, rtol=1e-5)
        lorakit.set_active(model, ["shared", "t0"])
        assert (mixed[0] - model(IDS4[:1]).logits[0]).abs().max() > 1e-3  # the task adapters differ


def test_mtlora_task_loss_reaches_only_the_shared_and_its_task_adapter():
    model = mtlora()
    params = lorakit.trainable_parameters(model)
    with tasks(model, "shared", TASKS, torch.tensor([1, 0, 2, 1])):
        model(IDS4).logits[[0, 3]].square().mean().backward()  # task t1's loss (rows 0 and 3)
    got = {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}
    for key, grad in got.items():
        if ".t0." in key or ".t2." in key:
            assert grad is None or not grad.any(), key
    for p in params.values():
        p.grad = None
    lorakit.set_active(model, ["shared", "t1"])
    model(IDS4[[0, 3]]).logits.square().mean().backward()  # the same loss on a model with only shared + t1
    for key, p in params.items():
        if ".shared." in key or ".t1." in key:
            assert got[key] is not None and got[key].abs().sum() > 0, key
            torch.testing.assert_close(got[key], p.grad, atol=1e-6, rtol=1e-4)


def test_mtlora_refuses_bad_tasks():
    model = mtlora()
    with pytest.raises(LorakitError, match="task 'nope' is not one of the tasks"):
        with tasks(model, "shared", TASKS, ["t0", "nope", "t1", "t1"]):
            pass
    with pytest.raises(ConfigError, match="shared"):
        add_tasks(tiny_llama(0), lorakit.LoraConfig(r=2, targets=["q_proj"]), ["a", "shared"])
    with pytest.raises(LorakitError, match="do not fit"), torch.no_grad():
        with tasks(model, "shared", TASKS, ["t0", "t1", "t2"]):  # 3 tasks for a batch of 4 rows
            model(IDS4)


# -- RecLoRA -----------------------------------------------------------------------------------------------------------
def reclora():
    model = tiny_llama(0)
    bank = add_bank(model, lorakit.LoraConfig(r=2, alpha=2, targets=["q_proj", "v_proj"]), 3)
    randomize(lorakit.trainable_parameters(model).values(), seed=2)
    router = lorakit.add_router(model, "users", UserRouter(3, user_dim=5, temperature=0.5))
    randomize(router.parameters(), std=1.0, seed=3)
    return model, bank, router


def test_reclora_batch_of_users_equals_each_users_own_merged_lora():
    model, bank, router = reclora()
    with torch.no_grad():
        with personalize(model, bank, router, USERS):
            mixed = model(IDS4).logits
        lorakit.adapt(model, lorakit.LoraConfig(r=6, alpha=6, targets=["q_proj", "v_proj"]), "user")
        spread = []
        for b in range(4):  # user b alone, with its own LoRA: rank 6, A = [A_i], B = [w_bi B_i]
            weights = torch.softmax((router.proj.weight @ USERS[b] + router.proj.bias) / 0.5, -1)  # tau = 0.5
            spread.append(weights)
            for host in hosts(model):
                own = host.adapters["user"]
                own.lora_A.weight.copy_(torch.cat([host.adapters[n].lora_A.weight for n in bank]))
                own.lora_B.weight.copy_(torch.cat([weights[i] * host.adapters[n].lora_B.weight
                                                   for i, n in enumerate(bank)], 1))
            lorakit.set_active(model, "user")
            torch.testing.assert_close(mixed[b], model(IDS4[b:b + 1]).logits[0], atol=1e-5, rtol=1e-5)
        spread = torch.stack(spread)
        assert (spread.max(0).values - spread.min(0).values).max() > 0.1  # the users' mixtures differ


def test_reclora_router_trains_over_a_frozen_bank_and_saves(tmp_path):
    model, bank, router = reclora()
    freeze(model, bank)
    before = expert_tensors(model, bank)
    params = lorakit.trainable_parameters(model)
    assert params and all(k.startswith("lorakit_routers.users.") for k in params)
    start = router(USERS).detach()

    def loss():
        with personalize(model, bank, router, USERS):
            return model(IDS4, labels=IDS4).loss
    train(model, 3, params.values(), loss, lr=0.05)
    after = expert_tensors(model, bank)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not torch.allclose(router(USERS), start)
    save_router(model, tmp_path / "users", "users")
    fresh = load_router(tiny_llama(0), tmp_path / "users", "users")
    assert isinstance(fresh, UserRouter) and torch.equal(fresh(USERS), router(USERS))


def test_reclora_refuses_bad_user_vectors():
    model, bank, router = reclora()
    for bad in (USERS[0], USERS[:, :4], USERS.unsqueeze(-1), USERS.long()):
        with pytest.raises(LorakitError, match=r"users must be a float tensor \(batch, user_dim=5\)"):
            with personalize(model, bank, router, bad):
                pass
    with pytest.raises(LorakitError, match="do not fit"), torch.no_grad():
        with personalize(model, bank, router, USERS[:3]):  # 3 users for 4 rows
            model(IDS4)
    with pytest.raises(ConfigError, match="names"):
        with personalize(model, bank[:2], router, USERS):
            pass
