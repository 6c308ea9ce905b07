"""What every peft-backed method shares: the task type, target checks, and `get_peft_model` with
errors a user can act on.

`wrap(model, peft_config)` is the one place a peft config meets a model: a 4-bit base is
prepared for k-bit training first (QLoRA: norms in fp32, input grads on), and peft's
own ValueError/TypeError become a ModelError naming the method (exit 2, one line).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import get_peft_model

from ftkit.errors import ModelError

#: module names of a classifier's head; peft's SEQ_CLS wrapper trains and saves these (`modules_to_save`)
CLASSIFIER_HEADS = ("classifier", "score")


def is_classifier(model: Any) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def task_type(model: Any) -> str:
    """peft's task type for `model`: SEQ_CLS for a sequence-classification model, else CAUSAL_LM.

    peft picks its wrapper (PeftModelForCausalLM, ...ForSequenceClassification) from it;
    the classification wrapper also trains and saves the new head (`modules_to_save`).
    """
    return "SEQ_CLS" if is_classifier(model) else "CAUSAL_LM"


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (16/32-bit or bitsandbytes 4/8-bit)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(name.split(".")[-1])
    return sorted(names)


def target_problems(model: Any, config: Any) -> list[str]:
    """One line per target key of `config` (`target_modules`, and (IA)³'s `feedforward_modules`)
    that names modules not among `model`'s linear layers. `model` may be a meta skeleton."""
    found = (_unknown_targets(model, getattr(config, key, None), f"method.{key}") for key in TARGET_KEYS)
    return [problem for problem in found if problem]


TARGET_KEYS = ("target_modules", "feedforward_modules")


def _unknown_targets(model: Any, target_modules: str | list[str] | None, key: str) -> str | None:
    if target_modules is None or isinstance(target_modules, str):  # all-linear
        return None
    known = linear_module_names(model)
    unknown = [t for t in target_modules if t not in known]
    if not unknown:
        return None
    return (
        f"{key}: {', '.join(unknown)} not among the model's linear modules; "
        f"use some of: {', '.join(known)} (or all-linear)"
    )


def check_target_modules(
    model: Any, target_modules: str | list[str] | None, key: str = "method.target_modules"
) -> None:
    """Every named target must be one of the model's linear layers; `all-linear` and None pass."""
    problem = _unknown_targets(model, target_modules, key)
    if problem:
        raise ModelError(problem)


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def hidden_size(model: Any) -> int:
    """The width of the model's token embeddings (prompt methods size their encoders by it)."""
    return int(model.get_input_embeddings().embedding_dim)


def wrap(model: Any, peft_config: Any, method: str) -> Any:
    """`peft.get_peft_model(model, peft_config)`; peft's refusals become
    ModelError('method.name: <method>: <peft's reason>').

    A 4-bit base is only frozen, not put through peft's `prepare_model_for_kbit_training`:
    that upcasts every 16-bit weight left (embeddings, head, norms: +2.1 GB for Llama-3.1-8B)
    to fp32, which buys nothing here (RMSNorm computes in fp32 anyway, the head's matmul runs
    in 16 bits under autocast) and is most of the gap between 7 and 17 GiB QLoRA (issue 9).
    Its other job, making inputs require grad for reentrant checkpointing, is moot: ftkit
    checkpoints non-reentrantly (ftkit.models.load.build_model).
    """
    if is_quantized(model):
        model.requires_grad_(False)
    try:
        return get_peft_model(model, peft_config)
    except (ValueError, TypeError, NotImplementedError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"method.name: {method}: peft cannot build it on this model: {reason}") from err
