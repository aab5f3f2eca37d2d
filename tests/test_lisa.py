"""LISA: only gamma sampled blocks (plus embeddings and head) train, frozen blocks get no update and hold no optimizer
state, draws change every K steps, the sampler resumes exactly, and it runs inside the lorakit Trainer."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from test_finetune import adapter, lm_options
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.errors import ConfigError
from lorakit.hooks import HookList
from lorakit.optim import build_optimizer
from lorakit.optim.lisa import LISA
from lorakit.train.run import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_frozen_blocks_get_no_update_and_hold_no_state(optimizer: str) -> None:
    model = tiny_llama()
    opt = build_optimizer(optimizer, dict(model.named_parameters()), lr=1e-2, **(
        {"rank": 4} if optimizer == "galore" else {}))
    hooks = HookList([LISA(gamma=2, interval=3, seed=1)])
    hooks.on_train_begin(model, opt)
    blocks, draws = model.model.layers, []
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    for step in range(9):
        hooks.before_forward(model, step)
        before = [[p.detach().clone() for p in b.parameters()] for b in blocks]
        embed = model.model.embed_tokens.weight.detach().clone()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks.after_step(model, opt, step + 1)
        trained = [i for i, b in enumerate(blocks) if all(p.requires_grad for p in b.parameters())]
        assert len(trained) == 2
        assert all(not p.requires_grad for i, b in enumerate(blocks) if i not in trained for p in b.parameters())
        for i, (block, old) in enumerate(zip(blocks, before)):
            moved = [not torch.equal(p, o) for p, o in zip(block.parameters(), old)]
            has_state = [p in opt.state and len(opt.state[p]) > 0 for p in block.parameters()]
            assert (all(has_state) and any(moved)) if i in trained else not (any(moved) or any(has_state))
        assert not torch.equal(model.model.embed_tokens.weight, embed)  # embeddings (tied head) train every step
        draws.append(tuple(trained))
    assert draws[0:3] == [draws[0]] * 3 and draws[3:6] == [draws[3]] * 3 and draws[6:] == [draws[6]] * 3
    assert len({draws[0], draws[3], draws[6]}) > 1


def test_the_sampler_resumes_from_a_weights_only_state() -> None:
    model = tiny_llama(6)
    straight, first = LISA(gamma=2, interval=2, seed=3), LISA(gamma=2, interval=2, seed=3)
    for hook in (straight, first):
        hook.on_train_begin(model, build_optimizer("adamw", dict(model.named_parameters()), lr=1e-3))
    draws = []
    for step in range(10):
        straight.before_forward(model, step)
        draws.append(straight.active)
        if step < 5:
            first.before_forward(model, step)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = LISA(gamma=2, interval=2, seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True), model)
    resumed.on_train_begin(model, build_optimizer("adamw", dict(model.named_parameters()), lr=1e-3))
    assert resumed.active == draws[4]
    for step in range(5, 10):
        resumed.before_forward(model, step)
        assert resumed.active == draws[step]


def test_lisa_in_the_trainer_trains_only_the_sampled_adapters(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    """LoRA's B starts at zero, so a layer whose adapter never trained still has B == 0 after fine-tuning."""
    finetune(lm_options(model_dir, texts, tmp_path, steps=3), hooks=[LISA(gamma=1, interval=100)])
    trained_layers = {key.split(".layers.")[1].split(".")[0] for key, t in adapter(tmp_path).items()
                      if "lora_B" in key and t.abs().sum() > 0}
    assert len(trained_layers) == 1


def test_bad_lisa_settings_are_refused() -> None:
    model = tiny_llama(2)
    opt = build_optimizer("adamw", dict(model.named_parameters()), lr=1e-3)
    with pytest.raises(ConfigError, match="gamma"):
        LISA(gamma=0)
    with pytest.raises(ConfigError, match="gamma"):
        LISA(gamma=3).on_train_begin(model, opt)
    with pytest.raises(ConfigError, match="no such submodule"):
        LISA(layers="model.nothing").on_train_begin(model, opt)
    with pytest.raises(ConfigError, match="on_train_begin"):
        LISA().before_forward(model, 0)
