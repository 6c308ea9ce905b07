"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen at its random init; only B trains.

ΔW = s · B A₀. With A frozen, the backward pass needs no gradient for A, so the adapter
does not keep the layer input x for it, only the r-dimensional A₀ x (the paper's
activation-memory saving), and the optimizer holds state for B alone.

With `projected_gradient` (default), B is updated by peft's `create_lorafa_optimizer`
(an AdamW): it replaces B's gradient by g̃_B = (1/s²) · g_B (A₀ A₀ᵀ)⁻¹, the B-update whose
ΔW = s · g̃_B A₀ is closest in Frobenius norm to the full fine-tuning gradient projected
onto A₀'s row space. Without it, B trains with plain train.optimizer.
"""

from __future__ import annotations

from typing import Any

from peft.optimizers import create_lorafa_optimizer

from ftkit.methods import lora
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.recipe.methods import LoraFaConfig

run_problems = lora.run_problems  # the same adapters: the same targets and init checks


def apply(model: Any, config: LoraFaConfig, run: RunInfo) -> Any:
    model = lora.apply(model, config, run)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    return model


def hooks(model: Any, config: LoraFaConfig, run: RunInfo) -> MethodHooks:
    found = lora.hooks(model, config, run)
    if config.projected_gradient:
        found.optimizer = lambda train: _projected_gradient_adamw(model, config, train)
    return found


def _projected_gradient_adamw(model: Any, config: LoraFaConfig, train: Any) -> Any:
    optimizer = create_lorafa_optimizer(
        model, r=config.r, lora_alpha=config.alpha, lr=float(train.lr), weight_decay=train.weight_decay
    )
    for group in optimizer.param_groups:
        group["betas"] = tuple(train.betas)  # peft fixes (0.9, 0.999); the recipe's betas win
    return optimizer
