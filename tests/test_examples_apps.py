"""Smoke runs of the application examples (AirLLM, CaLoRAify, educational guidance, LoRA3D, EigenTrajectory, EVA),
each checked on the property its mechanism must produce."""
from __future__ import annotations

import pytest
from example_loader import run_example

pytestmark = pytest.mark.usefixtures("one_thread")


def test_airllm_policy_sends_less_over_a_worse_channel_and_its_ranks_train() -> None:
    m = run_example("airllm")
    assert m["bytes_snr0"] < m["bytes_snr20"]  # the rank vector shrinks when the channel is poor
    assert m["reward_ppo_ddim"] > m["reward_ppo"]  # the guided DDIM refinement improves the coarse PPO decision
    assert m["reward_ppo_ddim"] <= m["reward_optimum"] + 1e-6
    assert m["bytes_policy"] < m["bytes_uniform"] / 2
    assert m["kl_policy"] < 0.7 * m["kl_base"]  # the adapter built from the vector learns the planted update


def test_caloraify_retrieval_finds_the_ingredients_and_a_language_side_lora_lowers_the_calorie_error() -> None:
    m = run_example("caloraify")
    assert m["retrieval_accuracy"] == 1.0
    assert m["adapted_outside_lm"] == 0  # the vision encoder and projector carry no adapter
    assert m["error_lora_rag"] < 0.8 * m["error_base"]


def test_educational_guidance_each_qlora_phase_lowers_its_loss() -> None:
    m = run_example("educational_guidance")
    assert m["nf4_layers"] == 14  # every linear layer of the 2-layer Llama but the head is stored in NF4
    assert m["synthetic_after"] < 0.95 * m["synthetic_before"]
    assert m["curated_after"] < 0.95 * m["curated_before"]


def test_lora3d_pseudo_labels_reject_wrong_matches_and_self_calibration_reduces_depth_error() -> None:
    m = run_example("lora3d")
    assert m["outlier_weight"] < 0.1 < 0.3 < m["inlier_weight"]
    assert m["pseudo_label_error"] < 0.2 * m["calib_before"]
    assert m["calib_after"] < 0.5 * m["calib_before"]
    assert m["held_out_after"] < 0.5 * m["held_out_before"]  # no ground truth used, and it carries to new views


def test_eigentrajectory_reconstruction_is_monotone_in_rank_and_et_anchors_beat_raw_coordinates() -> None:
    m = run_example("eigentrajectory")
    recon = [m[f"recon_rank_{k}"] for k in range(1, 25)]
    assert all(b <= a + 1e-6 for a, b in zip(recon, recon[1:]))
    assert recon[-1] < 1e-4  # exact at full rank
    assert m["et_ade"] < m["raw_ade"] and m["et_fde"] < m["raw_fde"]


def test_eva_weighted_ensemble_beats_every_single_adapter_on_average_and_merges_exactly() -> None:
    m = run_example("eva_world_model")
    singles = [m[f"{task}_mean"] for task in ("move", "grow", "fade", "rotate")]
    assert m["ensemble_mean"] < min(singles)
    for task in ("move", "grow", "fade", "rotate"):  # each adapter improves its own meta-task
        assert m[f"{task}_{task}"] < m[f"base_{task}"]
    assert m["merge_vs_mix"] < 1e-5
