"""The causal language-model task (`task: causal_lm`, objective sft): next-token cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ftkit.data import Example, collate
from ftkit.recipe.schema import Recipe
from ftkit.tasks.losses import CausalLMLoss
from ftkit.tasks.objective import evaluate


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


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its first parameter that is not on the meta device."""
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def token_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the batch's T input positions, shape (batch, T, vocab).

    Prompt tuning and P-tuning (peft) prepend n virtual tokens to the input, so the model
    returns T + n positions, the virtual ones first; position t of the input is position
    n + t of the output. Keeping the last T realigns them with the labels.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1] :, :]


def full_logits_sft() -> Any:
    """The SFT objective computing its loss from the model's full logits (`chunk_size=None`).

    Used wherever a model is only evaluated: the sum is the training loss (equal to the
    chunked one to float rounding), and it works on any model (adapted heads, disk-offloaded
    layers) without the chunked path's probe.
    """
    return SFT(CausalLMLoss(chunk_size=None))


class SFTWithAccuracy:
    """The SFT objective (same loss code) plus a count of correctly predicted trained tokens.

    Accuracy needs the logits, so the training loss runs in its full-logits mode
    (`CausalLMLoss(chunk_size=None)`: the same sum, equal to the chunked one to float
    rounding), and the model is wrapped so that forward pass hands its logits over:
    one forward per batch.
    """

    def __init__(self) -> None:
        self._sft = full_logits_sft()

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict:
        return self._sft.collate(examples, pad_id)

    def units(self, batch: dict) -> int:
        return self._sft.units(batch)

    def loss_sum(self, model: Any, batch: dict) -> tuple[Any, dict[str, Any]]:
        seen: dict[str, Any] = {}

        def forward(**inputs: Any) -> Any:
            seen["out"] = out = model(**inputs)
            return out

        loss, metrics = self._sft.loss_sum(forward, batch)
        labels = batch["labels"][:, 1:]
        predicted = seen["out"].logits[:, :-1, :].argmax(dim=-1)
        correct = ((predicted == labels) & (labels != -100)).sum()
        return loss, metrics | {"token_accuracy": correct}


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

    def synthetic_examples(self, rows: list[list[int]]) -> list[Example]:
        """Random token rows as examples (merge verification without data): every token after the first trains."""
        return [Example(row, [-100, *row[1:]], f"synthetic:{i}") for i, row in enumerate(rows)]

    def score(self, model: Any, examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, float]:
        """(logits at the real positions of `examples` in one right-padded batch, float32 on the CPU, and
        their SFT loss): what a merge must reproduce."""
        device = input_device(model)
        batch = collate(examples, pad_id)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
        real = batch["attention_mask"].bool()
        loss = evaluate(model, examples, len(examples), pad_id, device, full_logits_sft())["loss"]
        return logits.float().cpu()[real], loss
