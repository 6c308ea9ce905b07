"""Packing: several examples end to end in one `max_length` row, with no attention between them.

A padded batch of chat examples of 50–1000 tokens is mostly padding; a packed row is
mostly real tokens. Packing must not change what is learned, so three things hold:

1. position ids restart at 0 at every example, so each one sees the rotary positions it
   would see alone;
2. attention stays inside each example. The batch carries `position_ids` and the model
   gets no 2-D attention mask: transformers then derives the sequences from the position
   resets (`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal causal
   mask for sdpa / eager / flex, while flash-attention runs its varlen kernel from the same
   position ids on rows flattened to one (`ftkit.tasks.losses.model_inputs`);
3. no example predicts across a boundary: the label of every example's first token is
   -100 already (ftkit.data.encode), and that is the label the previous example's last
   token would have predicted.

So the per-token losses of a packed row equal those of its examples run one by one
(tests/unit/test_packing.py checks it to 1e-5 in fp32).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from ftkit.data.encode import Example


def pack_examples(examples: Sequence[Example], max_length: int, seed: int) -> tuple[list[Example], dict]:
    """(rows, stats): the examples packed into rows of at most `max_length` tokens.

    Best-fit decreasing: examples longest first (ties in a seeded order) each go into the
    open row with the least room that still fits them, or start a new row. It is a pure
    function of (lengths, max_length, seed), so a resumed run packs the same rows; the
    order of rows is then shuffled every epoch by `batch_order`, like examples.

    stats: examples, rows, tokens (real), row_tokens (rows × max_length) and
    efficiency = tokens / row_tokens (1.0 = no padding at all).
    """
    tiebreak = list(range(len(examples)))
    random.Random(f"ftkit-pack:{seed}").shuffle(tiebreak)
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), tiebreak[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise ValueError(f"{examples[i].source}: {n} tokens do not fit data.max_length {max_length}")
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    packed = [_join([examples[i] for i in row]) for row in rows]
    tokens = sum(len(ex.input_ids) for ex in examples)
    row_tokens = len(packed) * max_length
    stats = {
        "examples": len(examples),
        "rows": len(packed),
        "tokens": tokens,
        "row_tokens": row_tokens,
        "efficiency": tokens / max(row_tokens, 1),
    }
    return packed, stats


def _join(examples: list[Example]) -> Example:
    input_ids, labels, position_ids = [], [], []
    for ex in examples:
        input_ids += ex.input_ids
        labels += ex.labels
        position_ids += range(len(ex.input_ids))
    more = f" (+{len(examples) - 1} packed)" if len(examples) > 1 else ""
    return Example(input_ids=input_ids, labels=labels, source=examples[0].source + more, position_ids=position_ids)


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / padded tokens of right-padded batches (each padded to its longest member)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return real / max(padded, 1)
