"""The causal language-model task (`task: causal_lm`, objective sft): next-token cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ftkit.data import Example, collate
from ftkit.recipe.schema import Recipe
from ftkit.tasks.losses import CausalLMLoss


class SFT:
    """Supervised fine-tuning: next-token cross-entropy on trained tokens.

    loss = Σ_{t trained} −log p(x_t | x_<t)  /  (number of trained tokens in the window)

    The sum comes from `lm_loss` (ftkit.tasks.losses): chunked over the vocabulary, so full
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


def token_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the batch's T input positions, shape (batch, T, vocab).

    Prompt tuning and P-tuning (peft) prepend n virtual tokens to the input, so the model
    returns T + n positions, the virtual ones first; position t of the input is position
    n + t of the output. Keeping the last T realigns them with the labels.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1] :, :]


class CausalLMTask:
    """Supervised fine-tuning of a causal LM: the model learns to write the answers."""

    name = "causal_lm"
    generates_text = True
    summary_key = None

    def objective(
        self, recipe: Recipe, model: Any, splits: Any, run_dir: Path, device: Any, pad_id: int
    ) -> tuple[SFT, dict]:
        return SFT(CausalLMLoss.from_recipe(recipe)), {}

    def scoring_objective(self, recipe: Recipe) -> SFT:
        return SFT()

    def summarize(self, records: list[dict], facts: dict) -> dict | None:
        return None  # the loss curves and samples of every run are the whole story

    def report_section(self, summary: dict, facts: dict) -> str:
        return ""
