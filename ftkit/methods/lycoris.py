"""LoHa and LoKr through peft (the LyCORIS family): low-rank updates with a higher effective rank.

    loha   ΔW = (alpha / r) · (B₁ A₁) ⊙ (B₂ A₂)        Hadamard product (FedPara, Hyeon-Woo et al. 2022):
                                                     rank up to r² from 2 r (in + out) parameters.
    lokr   ΔW = (alpha / r) · C ⊗ (B A)              Kronecker product (Edalati et al. 2022): C small and
                                                     full, B A low-rank; ΔW's rank is rank(C) · rank(BA).

`rank_dropout` drops rank components and `module_dropout` whole adapters during training;
both are off at evaluation.
"""

from __future__ import annotations

from typing import Any

import peft

from ftkit.methods.adapters import check_target_modules, target_problems, task_type, wrap
from ftkit.methods.base import RunInfo
from ftkit.recipe.methods import LohaConfig, LokrConfig


def run_problems(config: LohaConfig | LokrConfig, skeleton: Any, run: RunInfo) -> list[str]:
    """Targets that are not linear layers of the model."""
    return target_problems(skeleton, config)


def apply(model: Any, config: LohaConfig | LokrConfig, run: RunInfo) -> Any:
    check_target_modules(model, config.target_modules)
    common = dict(
        r=config.r,
        alpha=config.alpha,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        task_type=task_type(model),
    )
    if isinstance(config, LokrConfig):
        peft_config = peft.LoKrConfig(
            decompose_both=config.decompose_both, decompose_factor=config.decompose_factor, **common
        )
    else:
        peft_config = peft.LoHaConfig(**common)
    return wrap(model, peft_config, config.name)
