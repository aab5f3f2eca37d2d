"""modules_to_save: whole modules trained per adapter, switched with it, saved with it (PEFT's keys, both ways)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

import lorakit
from lorakit.errors import LorakitError
from lorakit.modules_to_save import SavedModule

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft")  # a dev dependency: always installed by `make test`


class Classifier(nn.Module):
    """A body of two Linear layers and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def classifier(names: tuple[str, ...] = ("a",)) -> Classifier:
    """Adapters ``names`` (LoRA on the body, the first with its own head) with random, distinct tensors."""
    model = Classifier()
    for i, name in enumerate(names):
        saved = ["head"] if i == 0 else []
        lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["0", "2"], init="random", modules_to_save=saved), name)
    with torch.no_grad():
        for copy in model.head.modules_to_save.values():
            copy.weight.add_(1.0)
    return model


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def test_the_active_adapter_uses_its_copy_and_the_base_the_original() -> None:
    model = classifier(("a", "b"))
    head = model.head
    assert isinstance(head, SavedModule) and list(head.modules_to_save) == ["a"]
    lorakit.set_active(model, "a")
    torch.testing.assert_close(model(X), head.modules_to_save["a"](model.body(X)))
    lorakit.set_active(model, "b")  # b has no copy: the original head
    torch.testing.assert_close(model(X), head.original_module(model.body(X)))
    lorakit.set_active(model, "a")
    with lorakit.disable(model):
        torch.testing.assert_close(model(X), head.original_module(model.body(X)))
    assert model.head.weight is head.modules_to_save["a"].weight  # attributes are the active module's


def test_the_copy_trains_and_the_original_does_not() -> None:
    model = classifier()
    names = set(lorakit.trainable_parameters(model, "a"))
    assert {"head.modules_to_save.a.weight", "head.modules_to_save.a.bias"} <= names
    assert not model.head.original_module.weight.requires_grad
    model(X).pow(2).sum().backward()
    assert model.head.modules_to_save["a"].weight.grad is not None
    assert model.head.original_module.weight.grad is None


def test_adapters_never_target_a_module_to_save() -> None:
    model = Classifier()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets="all-linear", modules_to_save=["head"]))
    hosts = [h.path for h in lorakit.inject.hosts(model)]
    assert hosts == ["body.0", "body.2"]
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets="all-linear"), "b")  # nor another adapter, inside it
    assert [h.path for h in lorakit.inject.hosts(model)] == hosts


def test_clear_refusals() -> None:
    with pytest.raises(LorakitError, match="matched no module"):
        lorakit.adapt(Classifier(), lorakit.LoraConfig(targets=["0"], modules_to_save=["neck"]))
    model = Classifier()
    lorakit.adapt(model, lorakit.LoraConfig(targets=["head"]), "x")
    with pytest.raises(LorakitError, match="both adapted and saved"):
        lorakit.adapt(model, lorakit.LoraConfig(targets=["0"], modules_to_save=["head"]), "y")
    assert "y" not in lorakit.configs(model)
    model = classifier(("a",))
    lorakit.adapt(model, lorakit.LoraConfig(targets=["0"], modules_to_save=["head"]), "c")
    with pytest.raises(LorakitError, match="cannot be summed"):
        lorakit.set_active(model, ["a", "c"])


def test_routing_serves_rows_that_agree_and_refuses_rows_that_do_not() -> None:
    model = classifier(("a", "b"))
    lorakit.set_active(model, "b")
    with torch.no_grad():
        with lorakit.route(model, ["a"] * 4):
            rows_a = model(X)
        lorakit.set_active(model, "a")
        torch.testing.assert_close(rows_a, model(X))
        with lorakit.route(model, ["b", None, "b", None]):  # b and the base share the original head
            mixed = model(X)
        lorakit.set_active(model, "b")
        torch.testing.assert_close(mixed[0], model(X)[0])
        with pytest.raises(LorakitError, match="different versions of 'head'"):
            with lorakit.route(model, ["a", "b", "a", "b"]):
                model(X)
        with pytest.raises(LorakitError, match="cannot be weighted"):
            with lorakit.mix(model, ["a", "b"], torch.tensor([0.5, 0.5])):
                model(X)


def test_delete_and_unload_put_the_right_module_back() -> None:
    model = classifier(("a", "b"))
    original = model.head.original_module
    lorakit.delete_adapter(model, "a")
    assert model.head is original
    model = classifier(("a",))
    lorakit.set_active(model, "a")
    expected, copy = model(X), model.head.modules_to_save["a"]
    lorakit.unload(model, merge_active=True)
    assert model.head is copy
    torch.testing.assert_close(model(X), expected)


def tiny_classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


IDS = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def test_peft_loads_ours_with_the_same_keys(tmp_path) -> None:
    ours = lorakit.adapt(tiny_classifier(), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], init="random",
                                                               modules_to_save=["score"]))
    with torch.no_grad():
        ours.score.modules_to_save["default"].weight.normal_()
    expected = ours(IDS).logits
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    theirs = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).logits, expected)
    theirs.save_pretrained(tmp_path / "theirs")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    again = lorakit.load_adapter(tiny_classifier(), tmp_path / "ours")
    torch.testing.assert_close(again(IDS).logits, expected)


def test_ours_loads_peft_seq_cls(tmp_path) -> None:
    theirs = peft.get_peft_model(tiny_classifier(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], task_type="SEQ_CLS",
        init_lora_weights=False)).eval()
    with torch.no_grad():
        theirs.base_model.model.score.modules_to_save["default"].weight.normal_()
    theirs.save_pretrained(tmp_path / "theirs")  # its config lists ["score", "classifier"]: PEFT's task defaults
    ours = lorakit.load_adapter(tiny_classifier(), tmp_path / "theirs")
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits)
    with lorakit.disable(ours):
        torch.testing.assert_close(ours(IDS).logits, tiny_classifier()(IDS).logits)
