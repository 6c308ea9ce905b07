"""Partial fine-tuning: the first layers stay frozen, the last `trainable_layers` train.

The classic transfer-learning practice: low layers hold general features, the top
layers adapt to the task, at a fraction of full fine-tuning's optimizer memory.
A classifier's head (`score`, newly initialised) always trains.
"""

from __future__ import annotations

from typing import Any

from ftkit.errors import ModelError
from ftkit.methods.adapters import CLASSIFIER_HEADS, is_classifier
from ftkit.methods.base import RunInfo
from ftkit.models.load import decoder_layers
from ftkit.recipe.methods import FreezeConfig


def run_problems(config: FreezeConfig, skeleton: Any, run: RunInfo) -> list[str]:
    """`apply`'s refusal, found by applying it to the skeleton: it only sets requires_grad flags."""
    try:
        apply(skeleton, config, run)
    except ModelError as err:
        return [str(err)]
    return []


def apply(model: Any, config: FreezeConfig, run: RunInfo) -> Any:
    model.requires_grad_(False)
    layers = decoder_layers(model)
    if layers is None:
        raise ModelError("method.name: freeze cannot find the model's decoder layers; use lora or full")
    if config.trainable_layers > len(layers):
        raise ModelError(
            f"method.trainable_layers: {config.trainable_layers} is more than the model's {len(layers)} layers"
        )
    for layer in list(layers)[len(layers) - config.trainable_layers :]:
        layer.requires_grad_(True)
    names = dict(model.named_modules())
    if is_classifier(model):  # a classifier's head is new: it must learn, whatever else stays frozen
        for head in CLASSIFIER_HEADS:
            if head in names:
                names[head].requires_grad_(True)
    for wanted in config.trainable_modules:
        matches = [m for n, m in names.items() if n == wanted or n.endswith("." + wanted)]
        if not matches:
            top = sorted({n.split(".")[-1] for n in names if n and not n.split(".")[-1].isdigit()})
            raise ModelError(f"method.trainable_modules: no module named {wanted!r}; names here: {', '.join(top)}")
        for module in matches:
            module.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("method: nothing would train; raise method.trainable_layers or add trainable_modules")
    return model
