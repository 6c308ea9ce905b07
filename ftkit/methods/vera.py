"""VeRA (Kopiczko et al. 2024): one pair of random matrices for the whole model, per-layer scaling vectors.

    h = W x + Λ_b B Λ_d A x,   A ∈ R^{r×in}, B ∈ R^{out×r} random (Kaiming), frozen, shared
                                 by every adapted layer (sliced to its shape);
                               Λ_d = diag(d), d ∈ R^r (init d_initial), Λ_b = diag(b), b ∈ R^out (init 0).

Only b and d train: r + out values per layer, ~10× fewer than LoRA at r = 256. A and B
come from `projection_seed`; `save_projection` stores them in the adapter as well.
"""

from __future__ import annotations

from typing import Any

import peft

from ftkit.methods.adapters import check_target_modules, target_problems, task_type, wrap
from ftkit.methods.base import RunInfo
from ftkit.recipe.methods import VeraConfig


def run_problems(config: VeraConfig, skeleton: Any, run: RunInfo) -> list[str]:
    """Targets that are not linear layers of the model."""
    return target_problems(skeleton, config)


def apply(model: Any, config: VeraConfig, run: RunInfo) -> Any:
    check_target_modules(model, config.target_modules)
    peft_config = peft.VeraConfig(
        r=config.r,
        target_modules=config.target_modules,
        projection_prng_key=config.projection_seed,
        save_projection=config.save_projection,
        vera_dropout=config.dropout,
        d_initial=config.d_initial,
        modules_to_save=config.modules_to_save,
        task_type=task_type(model),
    )
    return wrap(model, peft_config, config.name)
