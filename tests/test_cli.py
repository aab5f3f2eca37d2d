"""The ``lorakit`` command line on a tiny random Llama saved to a folder with a tiny word-level tokenizer."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit.cli import main

POSITIVE = ["good", "great", "lovely", "happy", "fine"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "angry"]
FILLER = ["the", "day", "was", "my", "flight", "food", "and", "very", "today", "service"]
SPECIALS = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Five words each; one sentiment word decides the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model_folder(folder: Path, hidden: int = 32, kv_heads: int = 2) -> Path:
    """A 2-layer random Llama (4 heads) plus a word-level tokenizer (with a chat template) that knows every test
    word."""
    words = POSITIVE + NEGATIVE + FILLER + ["positive", "negative", "Text", ":", "Label", "hello", "world"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", sentiment_rows(240))


def finetune_args(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", str(data), "--task", "classification",
            "--eval-size", "40", "--steps", "40", "--lr", "3e-3", "--output", str(output), *extra]


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(model_dir: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "run"
    assert main(finetune_args(model_dir, data, output)) == 0
    return output


def test_finetune_learns_the_task_and_writes_a_peft_adapter(trained: Path, model_dir: Path) -> None:
    evals = {r["when"]: r for r in metrics(trained) if r["kind"] == "eval"}
    assert evals["after"]["accuracy"] > evals["before"]["accuracy"] + 0.2
    assert evals["after"]["loss"] < evals["before"]["loss"]
    assert [r["step"] for r in metrics(trained) if r["kind"] == "step"] == list(range(1, 41))
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    ours = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(model_dir), trained)
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), str(trained))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)
        assert not torch.allclose(ours(ids).logits, LlamaForCausalLM.from_pretrained(model_dir)(ids).logits)


def test_eval_command_reproduces_the_runs_held_out_scores(trained: Path, model_dir: Path, data: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    evals = {r["when"]: r for r in metrics(trained) if r["kind"] == "eval"}
    code = main(["eval", "--model", str(model_dir), "--data", str(data), "--task", "classification",
                 "--eval-size", "40", "--adapter", str(trained)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"before: accuracy {evals['before']['accuracy']:.1%}" in out
    assert f"after:  accuracy {evals['after']['accuracy']:.1%}" in out
    assert "majority-class rate" in out


def test_an_output_folder_holding_a_run_is_refused_unless_overwrite(trained: Path, model_dir: Path, data: Path,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    output = Path(shutil.copytree(trained, tmp_path / "run"))
    before = (output / "adapter_model.safetensors").read_bytes()
    assert main(finetune_args(model_dir, data, output, "--steps", "2")) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (output / "adapter_model.safetensors").read_bytes() == before
    assert main(finetune_args(model_dir, data, output, "--steps", "2", "--overwrite")) == 0
    assert json.loads((output / "run.json").read_text())["steps"] == 2
    assert not (output / "checkpoint-40").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no records"),
    ("label", "--label-column 'sentiment' is not a column"),
    ("targets", "matched no adaptable module"),
    ("not-empty", "holds no lorakit run"),
])
def test_bad_input_gets_a_clear_message_and_exit_code_2(case: str, message: str, model_dir: Path, data: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out"
    args = finetune_args(model_dir, data, output, "--steps", "1")
    if case == "missing":
        args[args.index("--data") + 1] = str(tmp_path / "nope.jsonl")
    elif case == "empty":
        args[args.index("--data") + 1] = str(write_jsonl(tmp_path / "empty.jsonl", []))
    elif case == "label":
        args += ["--label-column", "sentiment"]
    elif case == "targets":
        args += ["--targets", "no_such_proj"]
    else:
        output.mkdir()
        (output / "notes.txt").write_text("mine")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_applies_the_adapter_like_transformers_does(trained: Path, model_dir: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(model_dir), "--adapter", str(trained), "--prompt", "good day",
                 "--no-chat", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(model_dir), trained)
    inputs = tokenizer("good day", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert printed == tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_inspect_lists_every_targeted_layer_and_the_trainable_count(model_dir: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--model", str(model_dir), "--rank", "4", "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    config = lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"])
    model = lorakit.adapt(LlamaForCausalLM.from_pretrained(model_dir), config)
    expected = sum(p.numel() for p in lorakit.trainable_parameters(model).values())
    assert f"4 layers adapted; {expected:,} trainable parameters" in out
    assert out.count("q_proj") == 2 and out.count("v_proj") == 2
