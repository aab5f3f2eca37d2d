"""The refusal-rate evaluation: phrase matching, the rate over a prompt set, and ``lorakit eval --refusal``."""
from pathlib import Path

import pytest
import torch
from test_cli import make_model_folder

import lorakit
from lorakit.analysis.refusal import PROMPTS, is_refusal, refusal_rate
from lorakit.cli import main
from lorakit.train.model import load_model


@pytest.mark.parametrize("answer, refused", [
    ("I'm sorry, but I can't help with that.", True), ("I\u2019m sorry, I cannot do this", True),
    ("As an AI language model, I won't", True), ("Sure! Here is a note from Dr. Smith:", False),
    ("Here is the article." + " x" * 150 + " I cannot", False),  # a phrase after the opening does not count
])
def test_refusal_phrases_are_matched_in_the_opening_only(answer: str, refused: bool) -> None:
    assert is_refusal(answer) is refused


def test_refusal_rate_counts_the_refused_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = load_model(str(make_model_folder(tmp_path / "m")))
    refusing = {"hello"}  # prompts whose answer is a refusal, by the first word of the prompt

    def generate(input_ids, **kwargs):  # noqa: ANN001, ANN202 - stands in for model.generate
        prompt = tokenizer.decode(input_ids[0])
        answer = "negative" if any(w in prompt for w in refusing) else "positive"
        return torch.cat([input_ids, torch.tensor([tokenizer(answer, add_special_tokens=False)["input_ids"]])], 1)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr("lorakit.analysis.refusal.REFUSAL_PHRASES", ("negative",))
    result = refusal_rate(model, tokenizer, ["hello world", "day flight", "hello day", "food"], max_new_tokens=2)
    assert result.refused == [True, False, True, False] and result.rate == 0.5
    assert result.answers == ["negative", "positive", "negative", "positive"]


def test_eval_refusal_reports_base_and_adapter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_model_folder(tmp_path / "m")
    model, _ = load_model(str(folder))
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["q_proj"], init="random"), "default")
    lorakit.save_adapter(model, tmp_path / "a")
    assert main(["eval", "--refusal", "--model", str(folder), "--adapter", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"of {len(PROMPTS)} prompts" in out and "adapter refusal rate" in out
