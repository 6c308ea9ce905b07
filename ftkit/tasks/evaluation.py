"""What `ftkit eval` hands a task (`EvalSet`, `EvalOptions`) and what the task hands back (`Evaluation`).

The command loads the tokenizer and the examples and writes the result; the task measures.
A result is

    {target, weights, checkpoint}  the command's: what was measured
    Evaluation.fields               the task's, in order: the data, `tuned` (and `base`, `base_model`,
                                    `delta` with --baseline), anything else it measures
    {batch_size, device, wall_s, created}   the command's
    Evaluation.records_key: records        the task's per-example records (generations, predictions)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ftkit.data.encode import IGNORE
from ftkit.data.splits import sequences


@dataclass
class EvalSet:
    """Tokenized examples, their raw rows (for generation), and where they came from."""

    examples: list[Any]
    rows: list[dict]
    fmt: str
    label: str  # what the data was, in words: "data/val.jsonl" or "the run's validation set (...)"
    stem: str  # short name for the eval file: the data file's stem, or "heldout"
    own_val: bool = False  # the run's own validation set (not --data)

    def described(self) -> dict[str, Any]:
        """The result's fields naming the data: data, format, n_examples."""
        return {"data": self.label, "format": self.fmt, "n_examples": len(self.examples)}


@dataclass
class EvalOptions:
    """How `ftkit eval` was asked to measure."""

    batch_size: int
    baseline: bool = False  # measure the base the same way, and the difference
    generation: bool = True  # text tasks: generate and score exact match
    max_new_tokens: int | None = None  # text tasks: every row's generation budget (default: reference + slack)


@dataclass
class Evaluation:
    """A task's measurements: its fields of the result (in order) and its per-example records."""

    fields: dict[str, Any]
    records_key: str = "generations"
    records: list[dict] = field(default_factory=list)


def compared(tuned: dict[str, float], base: dict[str, float] | None, base_model: str | None) -> dict[str, Any]:
    """{tuned} alone, or with --baseline {tuned, base, base_model, delta} where delta = tuned − base per metric."""
    if base is None:
        return {"tuned": tuned}
    return {
        "tuned": tuned,
        "base": base,
        "base_model": base_model,
        "delta": {key: tuned[key] - base[key] for key in tuned},
    }


def trained_tokens(examples: Sequence[Any]) -> int:
    """Tokens that carry a loss in `examples` (both sides of preference pairs), the first of each excepted."""
    return sum(label != IGNORE for seq in sequences(list(examples)) for label in seq.labels[1:])
