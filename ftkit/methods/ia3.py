"""(IA)³ (Liu et al. 2022, "Infused Adapter by Inhibiting and Amplifying Inner Activations").

    attention keys / values:  h = l ⊙ (W x)        (the output is rescaled)
    feed-forward layers:      h = W (l ⊙ x)        (the input is rescaled)

One vector l per adapted layer, initialised to ones (training starts at the base model);
nothing else trains. The fewest parameters of the weight adapters; merging multiplies
l into W's rows or columns.
"""

from __future__ import annotations

from typing import Any

import peft
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

from ftkit.methods.adapters import check_target_modules, target_problems, task_type, wrap
from ftkit.methods.base import RunInfo
from ftkit.recipe.methods import Ia3Config


def model_problems(config: Ia3Config, model_config: Any) -> list[str]:
    """With target_modules or feedforward_modules null, peft must know the architecture's choice."""
    kind = getattr(model_config, "model_type", None)
    problems = []
    for key, given, known in (
        ("target_modules", config.target_modules, TARGETS),
        ("feedforward_modules", config.feedforward_modules, FEEDFORWARD),
    ):
        if given is None and kind not in known:
            problems.append(
                f"method.{key}: peft has no (IA)³ default for model type {kind}; list the modules "
                "(attention keys/values and the feed-forward output projection)"
            )
    return problems


def run_problems(config: Ia3Config, skeleton: Any, run: RunInfo) -> list[str]:
    """Targets that are not linear layers of the model."""
    return target_problems(skeleton, config)


def apply(model: Any, config: Ia3Config, run: RunInfo) -> Any:
    check_target_modules(model, config.target_modules)
    check_target_modules(model, config.feedforward_modules, key="method.feedforward_modules")
    peft_config = peft.IA3Config(
        target_modules=config.target_modules,
        feedforward_modules=config.feedforward_modules,
        modules_to_save=config.modules_to_save,
        task_type=task_type(model),
    )
    return wrap(model, peft_config, config.name)
