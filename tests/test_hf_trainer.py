"""transformers.Trainer / trl.SFTTrainer on a lorakit-adapted model: training, PEFT-format saving, resuming, and the
methods' training hooks (called in lorakit's order, saved in checkpoints, restored before the adapters)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import safetensors
import torch
import transformers
from torch import nn

import lorakit
from lorakit.hooks import HookList, TrainingHook, training_hooks
from lorakit.methods.dylora import DyLoraSampler, dylora_layers
from lorakit.rank import gated_layers, ranks_of
from lorakit.rank.sora import SoraHook
from lorakit.train.hf_trainer import HOOKS_FILE, LorakitTrainer, lorakit_trainer, restore_adapters, save_adapters

VOCAB = 64
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_base(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def adapted(base: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lorakit.adapt(base, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))


def token_dataset(rows: int = 12, length: int = 8):
    """Random token rows as a ``datasets.Dataset`` (a plain list of dicts when ``datasets`` is missing)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g).tolist()
    try:
        import datasets
    except ImportError:
        return [{"input_ids": row, "labels": row} for row in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(output_dir: Path, **overrides) -> transformers.TrainingArguments:
    options = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                   save_strategy="steps", save_steps=3, logging_strategy="no", use_cpu=True, report_to=[],
                   seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**options, **overrides})


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lorakit.trainable_parameters(model).items()}


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    trainable = {id(p) for p in lorakit.trainable_parameters(model).values()}
    return {k: v.detach().clone() for k, v in model.named_parameters() if id(v) not in trainable}


def assert_adapter_folder(folder: Path) -> None:
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & FULL_MODEL_FILES, files
    with safetensors.safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys  # adapter only, no base weights


def test_trainer_trains_adapter_and_saves_peft_format(tmp_path: Path) -> None:
    base = tiny_base()
    stock = copy.deepcopy(base)
    model = adapted(base)
    before, base_before = adapter_state(model), frozen_state(model)
    trainer = LorakitTrainer(model=model, args=training_args(tmp_path / "run"), train_dataset=token_dataset())

    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == set(lorakit.trainable_parameters(model)) and trainable
    trainer.train()

    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_A" in k)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)  # B starts at 0
    for k, v in frozen_state(model).items():
        assert torch.equal(v, base_before[k]), k

    assert trainer.lorakit_hook_list is not None and trainer.lorakit_hook_list.hooks == []  # LoRA has no rule
    for checkpoint in ("checkpoint-3", "checkpoint-6"):
        assert_adapter_folder(tmp_path / "run" / checkpoint)
        assert (tmp_path / "run" / checkpoint / "optimizer.pt").exists()
        assert not (tmp_path / "run" / checkpoint / HOOKS_FILE).exists()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert_adapter_folder(out)

    peft = pytest.importorskip("peft")
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        want = model(x).logits
        loaded = peft.PeftModel.from_pretrained(stock, str(out)).eval()
        got = loaded(x).logits
        with lorakit.disable(model):
            plain = model(x).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter matters, so the comparison below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = adapted(tiny_base())
    LorakitTrainer(model=full, args=training_args(tmp_path / "full"), train_dataset=token_dataset()).train()

    resumed = adapted(tiny_base(), seed=123)  # same base, other adapter init: only the checkpoint can make it equal
    trainer = LorakitTrainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))

    assert trainer.state.global_step == 6
    want, got = adapter_state(full), adapter_state(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0, msg=k)
    assert_adapter_folder(tmp_path / "resumed" / "checkpoint-6")


def test_load_best_model_at_end_restores_best_checkpoint(tmp_path: Path) -> None:
    model = adapted(tiny_base())
    # "higher loss is better" makes step 3 the best checkpoint, so the end state must be rolled back to it
    args = training_args(tmp_path / "run", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                         metric_for_best_model="loss", greater_is_better=True)
    trainer = LorakitTrainer(model=model, args=args, train_dataset=token_dataset(), eval_dataset=token_dataset(4))
    trainer.train()

    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-3"
    best = adapter_state(lorakit.load_adapter(tiny_base(), tmp_path / "run" / "checkpoint-3"))
    last = adapter_state(lorakit.load_adapter(tiny_base(), tmp_path / "run" / "checkpoint-6"))
    now = adapter_state(model)
    assert now.keys() == best.keys()
    assert all(torch.equal(now[k], best[k]) for k in now)
    assert any(not torch.equal(now[k], last[k]) for k in now)


def test_restore_adapters_in_place_keeps_parameters_flags_and_layout(tmp_path: Path) -> None:
    model = adapted(tiny_base())
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="style", activate=False)
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.normal_()
    saved = adapter_state(model)
    written = save_adapters(model, tmp_path)
    assert written == [str(tmp_path), str(tmp_path / "style")]
    assert_adapter_folder(tmp_path)
    assert_adapter_folder(tmp_path / "style")

    params = lorakit.trainable_parameters(model)
    for p in lorakit.trainable_parameters(model, "style").values():
        p.requires_grad_(False)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    rng = torch.random.get_rng_state()

    assert restore_adapters(model, tmp_path) == ["default", "style"]
    assert set(lorakit.configs(model)) == {"default", "style"}
    assert lorakit.active_adapters(model) == ["default"]
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for k, p in lorakit.trainable_parameters(model).items():
        assert p is params[k]
        assert torch.equal(p, saved[k]), k


def test_restore_adapters_refuses_a_mismatched_file(tmp_path: Path) -> None:
    other = lorakit.adapt(tiny_base(), lorakit.LoraConfig(r=2, alpha=8, targets="all-linear"))
    save_adapters(other, tmp_path)
    model = adapted(tiny_base())
    before = adapter_state(model)
    with pytest.raises(lorakit.AdapterFileError, match="does not match"):
        restore_adapters(model, tmp_path)
    assert set(lorakit.configs(model)) == {"default"}  # the temporary adapter is gone
    assert all(torch.equal(p, before[k]) for k, p in lorakit.trainable_parameters(model).items())
    assert all(p.requires_grad for p in lorakit.trainable_parameters(model).values())


def test_lorakit_trainer_factory() -> None:
    assert lorakit_trainer(transformers.Trainer) is LorakitTrainer
    assert issubclass(LorakitTrainer, transformers.Trainer)
    with pytest.raises(TypeError):
        lorakit_trainer(nn.Module)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tokenizers = pytest.importorskip("tokenizers")
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "big", "small", "red"]
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]", unk_token="[UNK]")


def test_sft_trainer_trains_and_saves_peft_adapter(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    tokenizer = tiny_tokenizer()
    texts = ["the cat sat on the mat", "a big dog ran on a log", "the small red cat sat", "a dog sat on the mat"]
    model = adapted(tiny_base())
    before, base_before = adapter_state(model), frozen_state(model)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2,
                         learning_rate=1e-2, max_length=16, bf16=False, save_strategy="steps", save_steps=3,
                         logging_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = lorakit_trainer(trl.SFTTrainer)(model=model, args=args, processing_class=tokenizer,
                                              train_dataset=datasets.Dataset.from_dict({"text": texts}))
    assert isinstance(trainer, trl.SFTTrainer)
    trainer.train()

    after = adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    for k, v in frozen_state(model).items():
        assert torch.equal(v, base_before[k]), k
    assert_adapter_folder(tmp_path / "sft" / "checkpoint-3")
    out = tmp_path / "sft-final"
    trainer.save_model(str(out))
    assert_adapter_folder(out)
    assert (out / "tokenizer.json").exists()

    reloaded = lorakit.load_adapter(tiny_base(), out)
    x = torch.tensor([tokenizer("the cat sat on a log")["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


# -- training hooks ------------------------------------------------------------------------------------------------
METHODS = {  # SoRA: lambda 5 at lr 1e-2 zeroes the gates set to 0.01 below at the first step; pruned every 2 steps
    "sora": dict(sparse_lambda=5.0, prune_every=2),
    "dylora": dict(r_min=1),
}


def method_model(method: str, seed: int = 0) -> nn.Module:
    """The tiny Llama with a ``method`` adapter; SoRA's gates start uneven so pruning keeps 3, 2 or 1 of 4 ranks."""
    base = tiny_base()
    torch.manual_seed(seed)
    model = lorakit.adapt(base, lorakit.build_config(method, r=4, alpha=8, targets="all-linear", **METHODS[method]))
    if method == "sora":
        with torch.no_grad():
            for i, (_, adapter) in enumerate(gated_layers(model, "default")):
                adapter.lora_E[: 1 + i % 3] = 0.01
    return model


class Recorder:
    """``default_data_collator`` that keeps every batch it makes, in order."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def manual_run(model: nn.Module, micro_batches: list[list[dict[str, torch.Tensor]]], hooks: list[TrainingHook],
               lr: float = 1e-2, max_grad_norm: float = 1.0) -> None:
    """lorakit's documented order (lorakit.hooks) in a plain loop, with the Trainer's loss normalisation (summed loss
    over the step's predicted tokens), gradient clipping, fused AdamW (transformers' default) and constant lr."""
    hook_list = HookList(hooks)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                  fused=True)
    model.train()
    hook_list.on_train_begin(model, optimizer)
    for step, batches in enumerate(micro_batches):
        hook_list.before_forward(model, step)
        items = sum(int(b["labels"][..., 1:].ne(-100).sum()) for b in batches)
        for batch in batches:
            model(**batch, num_items_in_batch=torch.tensor(items)).loss.backward()
        extra = hook_list.regulariser(model)
        if extra is not None:
            extra.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        hook_list.before_step(model, optimizer, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hook_list.after_step(model, optimizer, step + 1)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_hooks_train_as_lorakits_own_loop(method: str, tmp_path: Path) -> None:
    model = method_model(method)
    start = adapter_state(model)
    recorder = Recorder()
    args = training_args(tmp_path / "run", lr_scheduler_type="constant", save_strategy="no")
    trainer = LorakitTrainer(model=model, args=args, train_dataset=token_dataset(), data_collator=recorder)
    trainer.train()

    hooks = trainer.lorakit_hook_list.hooks
    assert [type(h) for h in hooks] == [SoraHook if method == "sora" else DyLoraSampler]
    assert len(recorder.batches) == 6

    reference = method_model(method)
    assert all(torch.equal(p, start[k]) for k, p in lorakit.trainable_parameters(reference).items())
    manual_run(reference, [[b] for b in recorder.batches],
               training_hooks(lorakit.configs(reference)["default"], "default", 6))
    want, got = adapter_state(reference), adapter_state(model)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0, msg=k)  # bitwise equal on CPU today

    if method == "sora":  # pruned in the accelerate-wrapped optimizer: same tensors, moments of the new shapes
        assert sorted(set(ranks_of(model, "default").values())) == [1, 2, 3]
        assert ranks_of(model, "default") == ranks_of(reference, "default")
        params = {id(p): p for group in trainer.optimizer.param_groups for p in group["params"]}
        trained = lorakit.trainable_parameters(model)
        assert set(params) == {id(p) for p in trained.values()}
        for p in trained.values():
            assert trainer.optimizer.optimizer.state[p]["exp_avg"].shape == p.shape
    else:  # the sampler drew ranks (the same draws as the manual loop's) and left the full rank after the step
        assert hooks[0].last is not None and all(a.rank is None for a in dylora_layers(model, "default"))


class Probe(TrainingHook):
    """Records the calls; its regulariser is ``c * sum(t)`` for a tensor ``t`` that gets no gradient from the loss
    (an adapter that is not active), so ``t.grad`` at ``before_step`` is ``c`` exactly when it is added once."""

    def __init__(self, tensor: torch.Tensor, c: float) -> None:
        self.tensor, self.c = tensor, c
        self.calls: list[tuple] = []
        self.grads: list[torch.Tensor] = []

    def on_train_begin(self, model, optimizer) -> None:
        self.calls.append(("begin",))

    def before_forward(self, model, step) -> None:
        self.calls.append(("before_forward", step))

    def regulariser(self, model) -> torch.Tensor:
        self.calls.append(("regulariser",))
        return self.c * self.tensor.sum()

    def before_step(self, model, optimizer, step) -> None:
        self.calls.append(("before_step", step))
        self.grads.append(self.tensor.grad.clone())

    def after_step(self, model, optimizer, step) -> None:
        self.calls.append(("after_step", step))


def test_regulariser_reaches_the_gradient_once_per_optimizer_step(tmp_path: Path) -> None:
    model = adapted(tiny_base())
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="probe", activate=False)
    tensor = next(p for k, p in lorakit.trainable_parameters(model, "probe").items() if "lora_A" in k)
    assert tensor.requires_grad
    probe = Probe(tensor, c=0.25)
    model.register_forward_pre_hook(lambda module, inputs: probe.calls.append(("forward",)))
    args = training_args(tmp_path / "run", max_steps=3, gradient_accumulation_steps=2, max_grad_norm=0.0,
                         save_strategy="no")
    trainer = LorakitTrainer(model=model, args=args, train_dataset=token_dataset(), lorakit_hooks=[probe])
    trainer.train()

    assert trainer.lorakit_hook_list.hooks == [probe]
    step = lambda s: [("before_forward", s), ("forward",), ("forward",), ("regulariser",), ("before_step", s),
                      ("after_step", s + 1)]  # noqa: E731
    assert probe.calls == [("begin",), *step(0), *step(1), *step(2)]
    assert len(probe.grads) == 3
    for grad in probe.grads:
        torch.testing.assert_close(grad, torch.full_like(grad, 0.25), atol=0, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_with_hooks_equals_uninterrupted_run(method: str, tmp_path: Path) -> None:
    args = dict(lr_scheduler_type="constant")
    full = method_model(method)
    LorakitTrainer(model=full, args=training_args(tmp_path / "full", **args), train_dataset=token_dataset()).train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = torch.load(checkpoint / HOOKS_FILE, weights_only=True)

    resumed = method_model(method, seed=123)  # same base, other init: only the checkpoint can make it equal
    if method == "sora":  # pruned at step 2: the fresh adapter must first be reshaped to the saved ranks
        assert sorted(set(saved["hooks"][0]["ranks"].values())) == [1, 2, 3]
        assert set(ranks_of(resumed, "default").values()) == {4}
    else:  # the sampler's generator goes on where it was
        assert set(saved["hooks"][0]) == {"generator"}
    trainer = LorakitTrainer(model=resumed, args=training_args(tmp_path / "resumed", **args),
                             train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))

    assert trainer.state.global_step == 6
    want, got = adapter_state(full), adapter_state(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0, msg=k)
    last = tmp_path / "resumed" / "checkpoint-6"
    assert (last / HOOKS_FILE).exists()
    if method == "sora":
        assert ranks_of(resumed, "default") == ranks_of(full, "default")
        assert ranks_of(lorakit.load_adapter(tiny_base(), last), "default") == ranks_of(full, "default")


def test_resume_without_the_hooks_state_is_refused(tmp_path: Path) -> None:
    LorakitTrainer(model=adapted(tiny_base()), args=training_args(tmp_path / "lora", max_steps=3),
                   train_dataset=token_dataset()).train()
    trainer = LorakitTrainer(model=method_model("dylora"), args=training_args(tmp_path / "dylora"),
                             train_dataset=token_dataset())
    with pytest.raises(lorakit.LorakitError, match=HOOKS_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "lora" / "checkpoint-3"))
