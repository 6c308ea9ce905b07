"""LoRA and QLoRA through peft's `LoraConfig`.

LoRA (Hu et al. 2021): h = W x + (alpha / r) · B A x, with W frozen, A ∈ R^{r×in}
(random init), B ∈ R^{out×r} (zeros, so training starts at the base model).
QLoRA (Dettmers et al. 2023) is the same adapter on a 4-bit NF4 base. The base is
only frozen, not put through peft's `prepare_model_for_kbit_training`: that upcasts every
16-bit weight left (embeddings, head, norms: +2.1 GB for Llama-3.1-8B) to fp32, which buys
nothing here (RMSNorm computes in fp32 anyway, the head's matmul runs in 16 bits under
autocast) and is most of the gap between 7 and 17 GiB QLoRA (issue 9). Its other job,
making inputs require grad for reentrant checkpointing, is moot: ftkit checkpoints
non-reentrantly (ftkit.models.build_model).
"""

from __future__ import annotations

from typing import Any

from ftkit.errors import ModelError
from ftkit.methods.configs import LoraConfig


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (16/32-bit or bitsandbytes 4/8-bit)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(name.split(".")[-1])
    return sorted(names)


def check_target_modules(model: Any, target_modules: str | list[str]) -> None:
    if target_modules == "all-linear":
        return
    known = linear_module_names(model)
    unknown = [t for t in target_modules if t not in known]
    if unknown:
        raise ModelError(
            f"method.target_modules: {', '.join(unknown)} not among the model's linear modules; "
            f"use some of: {', '.join(known)} (or all-linear)"
        )


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def peft_config(config: LoraConfig, **extra: Any) -> Any:
    """The peft `LoraConfig` for a LoRA-family recipe section."""
    import peft

    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        bias=config.bias,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        task_type="CAUSAL_LM",
        **extra,
    )


def apply(model: Any, config: LoraConfig, **extra: Any) -> Any:
    from peft import get_peft_model

    check_target_modules(model, config.target_modules)
    if is_quantized(model):
        model.requires_grad_(False)
    return get_peft_model(model, peft_config(config, **extra))
