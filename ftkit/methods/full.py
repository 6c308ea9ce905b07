"""Full fine-tuning: every weight of the model trains."""

from __future__ import annotations

from typing import Any

from ftkit.methods.base import RunInfo
from ftkit.recipe.methods import FullConfig


def apply(model: Any, config: FullConfig, run: RunInfo) -> Any:
    model.requires_grad_(True)
    return model
