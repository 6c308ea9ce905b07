"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention") through peft's `AdaptionPromptConfig`.

In each of the top `adapter_layers` decoder layers, the attention also attends to `adapter_len` trained
prompt positions P^ℓ (projected by the layer's own frozen k_proj / v_proj), and that extra attention is
added to the layer's output scaled by a trained gate g^ℓ that starts at zero:

    out^ℓ = Attn(q, K, V) + g^ℓ · softmax(q (P^ℓ W_k)ᵀ / √d) (P^ℓ W_v) W_o

so training starts exactly at the base model. peft supports the llama, mistral (and gpt2) layouts;
others are refused before the run starts. No weight matrix changes, so nothing can be merged.
"""

from __future__ import annotations

from typing import Any

import peft
from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

from ftkit.methods.adapters import wrap
from ftkit.methods.base import RunInfo
from ftkit.recipe.methods import LlamaAdapterConfig


def model_problems(config: LlamaAdapterConfig, model_config: Any) -> list[str]:
    """peft's LLaMA-Adapter knows the llama / mistral / gpt2 layouts; adapter_layers must fit the model."""
    kind = getattr(model_config, "model_type", None)
    if kind not in TRANSFORMERS_MODEL_CONFIG:
        return [
            f"method.name: llama_adapter: peft implements it for model types {', '.join(TRANSFORMERS_MODEL_CONFIG)}, "
            f"not {kind}; use another method (adapter, lora, prefix_tuning)"
        ]
    layers = getattr(model_config, "num_hidden_layers", None)
    if layers is not None and config.adapter_layers > layers:
        return [
            f"method.adapter_layers: {config.adapter_layers} is more than the model's {layers} decoder layers; "
            f"set it to at most {layers}"
        ]
    return []


def apply(model: Any, config: LlamaAdapterConfig, run: RunInfo) -> Any:
    peft_config = peft.AdaptionPromptConfig(
        adapter_len=config.adapter_len, adapter_layers=config.adapter_layers, task_type="CAUSAL_LM"
    )
    return wrap(model, peft_config, config.name)
