"""DyLoRA (METHODS.md entry 28): one nested-rank adapter evaluated and exported at every rank b, equal to a LoRA
trained on that truncation; its rank sampler reaches any trainer through the method's hooks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_rank import IDS, adapted, loss_of, optimizer_of, perturbed
from torch import nn
from zoo import tiny_llama

import lorakit
from lorakit.hooks import training_hooks
from lorakit.inject import configs, hosts
from lorakit.io.export import export_lora
from lorakit.methods.dylora import DyLoraSampler
from lorakit.rank.dylora import at_rank, truncate

pytestmark = pytest.mark.usefixtures("one_thread")


# -- DyLoRA ----------------------------------------------------------------------------------------------------
def lora_from_truncation(dy: nn.Module, b: int, alpha: float) -> nn.Module:
    lora = adapted("lora", r=b, alpha=alpha)
    with torch.no_grad():
        for hd, hl in zip(hosts(dy), hosts(lora)):
            hl.adapters["default"].lora_A.weight.copy_(hd.adapters["default"].a[:b])
            hl.adapters["default"].lora_B.weight.copy_(hd.adapters["default"].b[:, :b])
    return lora


def test_dylora_at_every_rank_equals_lora_built_from_the_truncated_factors() -> None:
    dy = perturbed(adapted("dylora", r=6, alpha=12.0))
    outputs = []
    for b in range(1, 7):
        with at_rank(dy, b):
            out = dy(IDS).logits
        outputs.append(out)
        torch.testing.assert_close(out, lora_from_truncation(dy, b, 12.0)(IDS).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy(IDS).logits, outputs[-1], atol=0, rtol=0)  # outside at_rank: the full rank
    assert not torch.allclose(outputs[0], outputs[-1])


def test_dylora_trained_at_rank_b_equals_lora_trained_on_that_truncation() -> None:
    b = 3
    dy = perturbed(adapted("dylora", r=6, alpha=12.0))
    lora = lora_from_truncation(dy, b, 12.0)
    rest = [h.adapters["default"].a[b:].detach().clone() for h in hosts(dy)]
    opt_dy, opt_lora = optimizer_of(dy, lr=0.01), optimizer_of(lora, lr=0.01)
    for _ in range(3):
        with at_rank(dy, b):
            loss_of(dy).backward()
        loss_of(lora).backward()
        for opt in (opt_dy, opt_lora):
            opt.step()
            opt.zero_grad(set_to_none=True)
    with at_rank(dy, b):
        torch.testing.assert_close(dy(IDS).logits, lora(IDS).logits, atol=1e-5, rtol=1e-5)
    for h, hl, r in zip(hosts(dy), hosts(lora), rest):
        torch.testing.assert_close(h.adapters["default"].a[:b], hl.adapters["default"].a, atol=1e-6, rtol=1e-6)
        assert torch.equal(h.adapters["default"].a[b:], r)  # ranks above b got no update


def test_dylora_frozen_mode_updates_only_the_sampled_rank() -> None:
    dy = perturbed(adapted("dylora", r=5, alpha=5.0, frozen=True))
    before = [(h.adapters["default"].a.detach().clone(), h.adapters["default"].b.detach().clone()) for h in hosts(dy)]
    opt = torch.optim.SGD(list(lorakit.trainable_parameters(dy).values()), lr=0.1)
    dy.train()
    with at_rank(dy, 3):
        loss_of(dy).backward()
    opt.step()
    for h, (a0, b0) in zip(hosts(dy), before):
        changed_a = (h.adapters["default"].a != a0).any(dim=1)
        changed_b = (h.adapters["default"].b != b0).any(dim=0)
        assert changed_a.tolist() == [False, False, True, False, False]
        assert changed_b.tolist() == [False, False, True, False, False]


def test_dylora_sampler_draws_ranks_in_range_and_the_trainer_gets_it(tmp_path: Path) -> None:
    dy = adapted("dylora", r=6, r_min=2)
    sampler = training_hooks(configs(dy)["default"], "default", 10)[0]
    assert isinstance(sampler, DyLoraSampler)
    drawn = []
    for step in range(40):
        sampler.before_forward(dy, step)
        drawn.append(next(iter(hosts(dy))).adapters["default"].rank)
        sampler.after_step(dy, None, step + 1)  # type: ignore[arg-type]
        assert next(iter(hosts(dy))).adapters["default"].rank is None
    assert set(drawn) == {2, 3, 4, 5, 6}


def test_dylora_truncated_for_export_is_a_rank_b_lora(tmp_path: Path) -> None:
    from peft import PeftModel

    dy = perturbed(adapted("dylora", r=6, alpha=12.0))
    with at_rank(dy, 3):  # export at a rank without cutting the adapter
        out3 = dy(IDS).logits.detach()
        export_lora(dy, tmp_path / "b3")
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "b3").eval()(IDS).logits, out3,
                               atol=1e-5, rtol=1e-5)
    with at_rank(dy, 2):
        out = dy(IDS).logits.detach()
    truncate(dy, 2)
    torch.testing.assert_close(dy(IDS).logits, out, atol=0, rtol=0)
    lorakit.save_adapter(dy, tmp_path / "own")
    fresh = tiny_llama(0)
    lorakit.load_adapter(fresh, tmp_path / "own")
    assert torch.equal(fresh(IDS).logits, out)
    export_lora(dy, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(IDS).logits, out, atol=1e-5, rtol=1e-5)
