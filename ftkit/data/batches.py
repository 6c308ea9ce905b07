"""Examples → batches: a seeded, length-grouped order of optimizer steps, their micro-batches, and
right-padding collation.

The data order is a pure function of (lengths, seed, epoch, examples per optimizer step): each
step's examples are chosen first (`batch_order` with the step's size), then cut into micro-batches
(`split_step`). So `batch_size 4 × grad_accum 1`, `2 × 2`, `1 × 4` and 2 processes × batch_size 2
train on the same examples in every step, and only the micro-batch (memory) changes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ftkit.data.encode import IGNORE, Example

MEGA_BATCHES = 64  # batches per sorting window: wide enough to group lengths, narrow enough to stay random


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """The batches of one epoch as lists of example indices; a pure function of (lengths, batch_size, seed, epoch).

    The loop calls it with batch_size = the examples of one optimizer step (batch_size ×
    grad_accum × processes) and splits each into micro-batches (`split_step`).

    1. permute all indices with random.Random seeded from (seed, epoch);
    2. cut the permutation into windows of 64 * batch_size and sort each window by length,
       longest first, so a batch holds similar lengths and little padding (with
       `group_by_length` false, nothing is sorted: the plain shuffled order);
    3. cut each window into batches of batch_size (the last batch of the epoch may be smaller;
       it is kept) and shuffle the order of all batches with the same generator.
    Every index appears exactly once. Resuming mid-epoch = recompute and skip the batches done.
    """
    rng = random.Random(f"ftkit-batch-order:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = (MEGA_BATCHES if group_by_length else 1) * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        if group_by_length:
            chunk = sorted(chunk, key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def split_step(step: Sequence[int], micro_size: int) -> list[list[int]]:
    """A step's examples (longest first when grouped by length) as consecutive micro-batches of
    `micro_size` (the last may be smaller: the last step of an epoch can be short)."""
    return [list(step[i : i + micro_size]) for i in range(0, len(step), micro_size)]


def micro_batch_order(
    lengths: Sequence[int], step_size: int, micro_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Every micro-batch of one epoch, in order: the steps of `batch_order(lengths, step_size, ...)` split."""
    order = batch_order(lengths, step_size, seed, epoch, group_by_length)
    return [micro for step in order for micro in split_step(step, micro_size)]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """input_ids, attention_mask and labels as int64 tensors, right-padded to the longest example.

    Padding has input id `pad_id`, attention 0 and label -100 (never trained). Packed rows
    (examples with `position_ids`) also get `position_ids`; their padding counts 0, 1, ...
    as one more sequence of its own, so it never joins the last real one.
    """
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(ex.position_ids is not None for ex in examples):
        position_ids = torch.arange(width, dtype=torch.long).repeat(len(examples), 1)
        for row, ex in enumerate(examples):
            n = len(ex.input_ids)
            own = ex.position_ids if ex.position_ids is not None else range(n)
            position_ids[row, :n] = torch.tensor(list(own), dtype=torch.long)
            position_ids[row, n:] = torch.arange(width - n)
        batch["position_ids"] = position_ids
    return batch
