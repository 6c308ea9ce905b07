"""Training objectives: how a batch becomes a loss. The loop knows only this interface.

An objective provides
    collate(examples, pad_id) -> batch            tensors for one micro-batch
    units(batch) -> int                           how many loss units the batch holds
    loss_sum(model, batch) -> (loss, metrics)     loss summed over those units (a tensor),
                                                  plus metric sums over the same units
The loop divides by the units of the whole accumulation window, so every unit weighs
the same however the window is cut into micro-batches. An objective whose loss is not a
token cross-entropy sets `reports_perplexity = False`, so no val_ppl is logged for it.

`objective.name` in a recipe picks one: sft here, dpo / ipo / orpo / simpo in
ftkit.train.preference (built with their reference by `prepare_objective`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ftkit.data import Example, collate
from ftkit.losses import CausalLMLoss


class SFT:
    """Supervised fine-tuning: next-token cross-entropy on trained tokens.

    loss = Σ_{t trained} −log p(x_t | x_<t)  /  (number of trained tokens in the window)

    The sum comes from `lm_loss` (ftkit.losses): chunked over the vocabulary, so full
    fp32 logits never exist, and packed batches keep attention inside each example.
    """

    name = "sft"
    reports_perplexity = True

    def __init__(self, lm_loss: CausalLMLoss | None = None):
        self.lm_loss = lm_loss or CausalLMLoss()

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens that carry a loss (labels shifted by one, as in `loss_sum`)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.lm_loss(model, batch), {}
