"""Smoke runs of the examples built on modules_to_save, adapter-scale schedules and staged layer training."""
from __future__ import annotations

import pytest
from example_loader import run_example

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lola_specvit_follows_the_cyclical_strength_schedule() -> None:
    m = run_example("lola_specvit")
    assert m["schedule_error"] == 0.0  # every step ran at exactly the triangle's strength
    assert (m["strength_min"], m["strength_max"]) == (0.25, 1.0)
    assert m["loss_after"] < m["loss_before"]
    assert m["trainable_pct"] < 20


def test_lorat_trains_and_saves_the_new_embeddings_and_head() -> None:
    m = run_example("lorat")
    assert m["iou_after"] > m["iou_before"]
    assert m["head_moved"] > 0.1  # the head's copy trained; the saved file holds it and the type embeddings
    assert m["saved_module_tensors"] == 5 and m["lora_tensors"] > 0
    assert m["reload_max_diff"] == 0.0  # a tracker with another random head predicts the same after load_adapter


def test_hivg_trains_only_the_current_stage_and_keeps_earlier_stages() -> None:
    m = run_example("hivg")
    assert m["steps_outside_stage"] == 0.0
    assert m["steps_training_stage"] == m["steps"]  # every step did train its own stage
    assert m["first_stage_effect"] > 1e-3  # the frozen first stage still shapes the output
