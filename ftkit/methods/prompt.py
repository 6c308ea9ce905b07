"""The prompt family through peft: the model stays frozen; what trains is input it attends to.

    prompt_tuning   x' = [P ; E(x)], P ∈ R^{n×d} trained (Lester et al. 2021); init random, or the
                    embeddings of init_text's tokens.
    p_tuning        x' = [f(P₀) ; E(x)], f an MLP or LSTM+MLP prompt encoder (Liu et al. 2021).
    prefix_tuning   every attention layer ℓ sees keys [P_k^ℓ ; K^ℓ] and values [P_v^ℓ ; V^ℓ]
                    (Li & Liang 2021), optionally produced by an MLP (projection).

For prompt and p-tuning, peft prepends n virtual positions to the input, so the logits
have n more positions than the labels; ftkit's objectives keep the last T (see
`ftkit.tasks.objective`). No weight matrix changes, so these adapters cannot be merged.
"""

from __future__ import annotations

from typing import Any

import peft

from ftkit.methods.adapters import hidden_size, task_type, wrap
from ftkit.methods.base import RunInfo
from ftkit.recipe.methods import PrefixTuningConfig, PromptTuningConfig, PTuningConfig


def apply(model: Any, config: PromptTuningConfig | PrefixTuningConfig | PTuningConfig, run: RunInfo) -> Any:
    return wrap(model, peft_config(config, model), config.name)


def peft_config(config: PromptTuningConfig | PrefixTuningConfig | PTuningConfig, model: Any) -> Any:
    common = dict(num_virtual_tokens=config.num_virtual_tokens, task_type=task_type(model))
    if isinstance(config, PromptTuningConfig):
        if config.init == "text":
            return peft.PromptTuningConfig(
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text=config.init_text,
                tokenizer_name_or_path=model.name_or_path,  # the base's own tokenizer encodes init_text
                **common,
            )
        return peft.PromptTuningConfig(prompt_tuning_init="RANDOM", **common)
    if isinstance(config, PrefixTuningConfig):
        return peft.PrefixTuningConfig(
            prefix_projection=config.projection,
            encoder_hidden_size=config.encoder_hidden_size or hidden_size(model),
            **common,
        )
    return peft.PromptEncoderConfig(
        encoder_reparameterization_type=config.encoder.upper(),
        encoder_hidden_size=config.encoder_hidden_size or hidden_size(model),
        encoder_num_layers=config.encoder_num_layers,
        encoder_dropout=config.encoder_dropout,
        **common,
    )
