"""LoRA+ (Hayou et al. 2024): LoRA whose B factor learns λ times faster than A.

In a wide network the two factors of ΔW = s · B A want different step sizes: with one
LR for both, either A's updates are too large or B's too small. LoRA+ sets
η_B = λ · η_A (λ = `lr_ratio`, the paper suggests 2⁴) and reports 1-2% better results
and up to 2× faster convergence than LoRA at the same cost.

The groups follow peft's `create_loraplus_optimizer`: B matrices and 1-D parameters
(biases, DoRA magnitudes) at λ · lr, everything else (A, modules_to_save) at lr. They are
returned as `lr_scale`s, so the LR schedule and every train.optimizer apply unchanged.
"""

from __future__ import annotations

from typing import Any

from ftkit.methods import lora
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.recipe.methods import LoraPlusConfig

run_problems = lora.run_problems  # the same adapters: the same targets and init checks


def apply(model: Any, config: LoraPlusConfig, run: RunInfo) -> Any:
    return lora.apply(model, config, run)


def param_groups(model: Any, lr_ratio: float) -> list[dict]:
    """[{params: A and the rest, lr_scale: 1}, {params: B and 1-D params, lr_scale: lr_ratio}], empty groups dropped."""
    slow, fast = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b = "lora_B" in name or "lora_embedding_B" in name or param.ndim == 1
        (fast if is_b else slow).append(param)
    groups = [{"params": slow, "lr_scale": 1.0}, {"params": fast, "lr_scale": float(lr_ratio)}]
    return [group for group in groups if group["params"]]


def hooks(model: Any, config: LoraPlusConfig, run: RunInfo) -> MethodHooks:
    found = lora.hooks(model, config, run)
    found.param_groups = param_groups(model, config.lr_ratio)
    return found
