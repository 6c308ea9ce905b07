"""Training objectives: how a batch becomes a loss. The loop knows only this interface.

An objective provides
    collate(examples, pad_id) -> batch            tensors for one micro-batch
    units(batch) -> int                           how many loss units the batch holds
    loss_sum(model, batch) -> (loss, metrics)     loss summed over those units (a tensor),
                                                  plus metric sums over the same units
The loop divides by the units of the whole accumulation window, so every unit weighs
the same however the window is cut into micro-batches. Optional:
    window_metrics() -> {name: value}             figures of the step just done that are not per-unit
                                                  sums (grpo: reward means over completions); the loop
                                                  asks once per step and logs them as they are
An objective whose loss is not a token cross-entropy sets `reports_perplexity = False`, so no val_ppl is logged for it.

Each task provides its objective: SFT (ftkit.tasks.causal_lm), dpo / ipo / orpo / simpo
(ftkit.tasks.preference), classification (ftkit.tasks.classification). `evaluate` below
averages any objective over a set of examples, on one process or many.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ftkit.distributed import collectives


class Objective(Protocol):
    """What the loop and `evaluate` ask of a task's objective (see the module docstring)."""

    name: str
    reports_perplexity: bool

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]: ...


@torch.no_grad()
def evaluate(
    model: Any,
    examples: Sequence[Any],
    batch_size: int,
    pad_id: int,
    device: Any,
    objective: Objective,
    accelerator: Any = None,
) -> dict[str, float]:
    """Unit-weighted means over `examples`: `loss` (SFT: sum of token losses / trained tokens)
    and the objective's metrics.

    With an `accelerator` running N processes, each evaluates its slice of every batch of
    batch_size × N and the sums are added over processes, so every process returns the
    same means as one process would (all must call it: sharded models gather in forward).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    total, units, metric_sums = 0.0, 0, {}
    for start in range(0, len(order), batch_size * world):
        chunk = order[start : start + batch_size * world]
        part, weight = collectives.rank_examples(examples, chunk, rank, world)  # weight 0: nothing of it here
        batch = {k: v.to(device) for k, v in objective.collate(part, pad_id).items()}
        loss, metrics = objective.loss_sum(model, batch)
        total += weight * float(loss)
        units += weight * objective.units(batch)
        for key, value in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + weight * float(value)
    model.train(was_training)
    if world > 1:
        keys = sorted(metric_sums)
        total, units, *sums = collectives.global_sums(accelerator, [total, units, *(metric_sums[k] for k in keys)])
        metric_sums = dict(zip(keys, sums, strict=True))
    n = max(units, 1)
    return {"loss": total / n} | {key: value / n for key, value in metric_sums.items()}


#: metric holding a method's training penalty: part of the loss that trains, reported apart from `loss`
PENALTY = "reg_loss"


class Regularized:
    """An objective plus a method's training-time penalty R (e.g. AdaLoRA's orthogonality term).

    Per micro-batch it adds R · units(batch) to the loss sum; the loop divides by the
    window's units, so the step's loss is (objective's loss) + R exactly once, however
    the window is cut. The loop logs `loss` without R and R as `reg_loss` (PENALTY), and
    evaluation (model in eval mode) gets the plain objective, so loss and val_loss stay
    comparable across methods.
    """

    def __init__(self, objective: Any, penalty: Any):
        self.objective, self.penalty = objective, penalty
        self.name = objective.name
        self.reports_perplexity = getattr(objective, "reports_perplexity", True)  # a classifier's loss is no LM's

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return self.objective.collate(examples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.objective.units(batch)

    def window_metrics(self) -> dict[str, float]:
        return self.objective.window_metrics() if hasattr(self.objective, "window_metrics") else {}

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.objective.loss_sum(model, batch)
        if not model.training:
            return loss, metrics
        weighted = self.penalty() * self.units(batch)
        return loss + weighted, {**metrics, PENALTY: float(weighted.detach())}
