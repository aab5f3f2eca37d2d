"""The six diffusion application examples (METHODS.md entries 87, 88, 89, 92, 96, 98) in smoke mode, each checked on
a property of its mechanism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from example_loader import load_example, run_example

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scale_dit_local_attention_is_cheap_exact_and_trainable() -> None:
    metrics = run_example("scale_dit")
    assert metrics["local_loss_after"] < metrics["local_loss_before"]  # the LoRA bridges the swapped attention
    assert metrics["flops_ratio"] == metrics["score_memory_ratio"] == (16 + 4) / 1024

    attention = load_example("scale_dit").local_global_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 16, 8, generator=gen).unbind(0)  # a 4x4 token grid, 2 heads of width 4
    none = torch.zeros(2, 0, 8)
    heads = lambda x: x.view(2, -1, 2, 4).transpose(1, 2)
    dense = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, 16, 8)
    torch.testing.assert_close(attention(q, k, v, none, none, 2, window=4), dense)  # one window = dense attention
    k2, v2 = k.clone(), v.clone()
    k2[:, 15], v2[:, 15] = 5.0, 5.0  # the last token lies in the last 2x2 window
    local, moved = attention(q, k, v, none, none, 2, window=2), attention(q, k2, v2, none, none, 2, window=2)
    torch.testing.assert_close(moved[:, :10], local[:, :10])  # rows 0-9 hold no query of that window
    assert not torch.allclose(moved[:, 15], local[:, 15])
    glob = torch.randn(2, 3, 8, generator=gen)
    with_glob = attention(q, k, v, glob, glob, 2, window=2)
    assert not torch.allclose(with_glob[:, 0], local[:, 0])  # global tokens reach every window


def test_osdiffst_matches_style_colours_and_keeps_content() -> None:
    metrics = run_example("osdiffst")
    assert metrics["colour_loss_after"] < 0.5 * metrics["colour_loss_before"]
    assert metrics["content_match_after"] >= 3 / 16  # outputs keep their own content; chance: 1/16


def test_authenlora_detector_separates_lora_from_base_outputs() -> None:
    metrics = run_example("authenlora")
    assert metrics["bit_accuracy_lora"] >= 0.8
    assert metrics["bit_accuracy_base"] < 0.7  # the zero message shares half its bits with the secret
    assert metrics["detection_rate_lora"] - metrics["false_positive_rate_base"] >= 0.5


def test_lora_distillation_teacher_is_the_base_and_shares_its_storage() -> None:
    metrics = run_example("lora_distillation")
    assert metrics["teacher_vs_base_max_diff"] == 0.0  # lorakit.disable gives the base model exactly
    assert metrics["teacher_only_tensors"] == metrics["student_only_tensors_not_lora"] == 0
    assert metrics["base_tensors_shared"] > 100
    assert metrics["memory_ratio"] < 0.6
    assert metrics["distill_loss_after"] < metrics["distill_loss_before"]


def test_datadream_per_class_loras_fit_and_feed_the_classifier() -> None:
    metrics = run_example("datadream")
    assert metrics["shot_loss_after"] < metrics["shot_loss_before"]
    assert metrics["synthetic_images"] == 4 * 16
    assert metrics["accuracy_datadream"] > metrics["chance"] + 0.1


def test_easyref_branch_is_decoupled_and_both_adapters_learn() -> None:
    metrics = run_example("easyref")
    assert metrics["zero_branch_gap"] == 0.0  # lambda = 0 leaves the base UNet exactly
    assert metrics["loss_easyref"] < metrics["loss_base"]
    assert metrics["loss_lora_per_group"] < metrics["loss_base"]
