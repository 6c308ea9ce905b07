"""The merge check's figures: relative to the logits' scale, blind to a shift per position."""

from __future__ import annotations

import torch

from ftkit.commands.merge import MERGE_TOLERANCE, logit_agreement


def test_shift_per_position_is_not_a_difference():
    reference = torch.randn(6, 50) * 20
    shifted = reference + torch.arange(6.0)[:, None]  # softmax cannot see a per-position shift
    figures = logit_agreement(reference, shifted)
    assert figures["rel_logit_diff"] < 1e-6 and figures["top1_agreement"] == 1.0 and figures["mean_kl"] < 1e-6
    assert figures["max_abs_logit_diff"] >= 5.0  # the raw figure still shows the shift


def test_the_same_relative_error_passes_at_any_scale_and_a_larger_one_fails():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(8, 100, generator=generator)
    noise = torch.randn(8, 100, generator=generator)
    for scale in (1.0, 20.0, 300.0):  # a toy's logits ~1, SmolLM2's ~20
        reference = base * scale
        close = reference + 1e-6 * scale * noise
        far = reference + 1e-3 * scale * noise
        assert logit_agreement(reference, close)["rel_logit_diff"] <= MERGE_TOLERANCE["float32"]
        assert logit_agreement(reference, far)["rel_logit_diff"] > MERGE_TOLERANCE["float32"]
