"""`ftkit plan` counts Medusa's trainable parameters on a Llama-3.1-8B-shaped config (no weights):
per head, H² + H per residual block, plus V·H for its own projection (none when shared)."""

from __future__ import annotations

from tests.unit.test_plan import LLAMA_31_8B, model_dirs, plan_of  # noqa: F401  (model_dirs: the fixture)

H, V = LLAMA_31_8B["hidden_size"], LLAMA_31_8B["vocab_size"]


def test_shared_projection_trains_only_the_blocks(model_dirs):  # noqa: F811
    plan = plan_of(model_dirs["8b"], "medusa", method__heads=4, method__projection="shared")
    assert plan.params_trainable == 4 * (H * H + H) == 67_125_248


def test_own_projection_adds_a_vocabulary_matrix_per_head(model_dirs):  # noqa: F811
    plan = plan_of(model_dirs["8b"], "medusa", method__heads=4, method__head_layers=2)
    assert plan.params_trainable == 4 * (2 * (H * H + H) + V * H) == 2_235_596_800
    lora = plan_of(model_dirs["8b"], "medusa", method__heads=4, method__projection="shared", method__base="lora")
    # + PEFT's count for r=16 on every linear layer of Llama-3-8B (tests/unit/test_plan.py)
    assert lora.params_trainable == 4 * (H * H + H) + 41_943_040
    assert plan.params_total == 8_030_261_248 + plan.params_trainable
