"""Optimizers and the learning-rate schedule.

The LR is a pure function of the optimizer step (`lr_at`), set on the param groups
before every step; there is no scheduler object whose state could drift on resume.
"""

from __future__ import annotations

import math
from typing import Any

import bitsandbytes as bnb
import torch

from ftkit.recipe.schema import TrainSection


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    return int(math.ceil(train.warmup_ratio * total_steps))


def lr_at(step: int, train: TrainSection, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`.

    Linear warmup from lr/warmup to lr over `w` steps, then `constant`, `linear` or
    `cosine` decay from lr to lr·min_lr_ratio at the last step.
    """
    peak = float(train.lr)
    w = warmup_steps(train, total_steps)
    if step < w:
        return peak * (step + 1) / w
    if train.scheduler == "constant":
        return peak
    floor = peak * train.min_lr_ratio
    span = max(1, total_steps - w - 1)
    progress = min(1.0, (step - w) / span)
    if train.scheduler == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[Any], train: TrainSection) -> Any:
    """torch AdamW, or a bitsandbytes 8-bit / paged optimizer, over the trainable params."""
    kwargs = dict(lr=float(train.lr), betas=tuple(train.betas), weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[train.optimizer]
    return cls(params, **kwargs)
