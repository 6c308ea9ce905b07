"""What `ftkit generate` hands a task (`Inputs`, `PredictOptions`) and how predictions are written.

Output, whatever the task predicts: one line per plain input (`line`), or each JSONL row
given back with the task's fields added (`fields`: a completion, a label and its probabilities).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from ftkit.tasks.generation import Sampling


@dataclass
class Inputs:
    """One --prompt, or the items piped on stdin: plain lines, or JSONL rows (`is_jsonl`)."""

    items: list[str | dict]
    is_jsonl: bool
    from_prompt: bool  # the one item is --prompt (a causal LM streams it)

    def source(self, index: int) -> str:
        """Where item `index` came from, for error messages: --prompt or stdin:LINE."""
        return "--prompt" if self.from_prompt else f"stdin:{index + 1}"


@dataclass
class PredictOptions:
    """How `ftkit generate` was asked to predict."""

    sampling: Sampling
    batch_size: int = 8
    template: bool = True  # render plain prompts with the chat template (causal LM)


def write_predictions(out: TextIO, inputs: Inputs, lines: Sequence[str], fields: Sequence[dict]) -> None:
    """`lines[i]` per plain input, or each JSONL row with `fields[i]` added, one per line."""
    for item, line, extra in zip(inputs.items, lines, fields, strict=True):
        if inputs.is_jsonl:
            out.write(json.dumps({**item, **extra}, ensure_ascii=False) + "\n")
        else:
            out.write(line + "\n")
    out.flush()
