"""Prompt rows (`data.format: prompt`, for objective grpo): a prompt to sample completions from, plus the
columns the rewards read.

Row: {"prompt": str | [messages...], "system"?: str, "answer"?: str, ...any other columns}. The prompt
is the user's message (or a conversation not ending with the assistant), rendered through the tokenizer's
chat template with the generation prompt, as SFT renders the text before an answer
(ftkit.data.formats.render), so a model fine-tuned with SFT sees the same text here. Every column of the
row stays with the example (`columns`) for the rewards: `answer` is what exact_match and field_f1 compare
with; a user's reward function gets every column.

A prompt longer than data.max_length tokens loses its start (as SFT truncates) and is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftkit.data.formats import render
from ftkit.data.preference import _prompt_messages  # the same prompt forms as preference rows
from ftkit.errors import DataError

FIELDS = "prompt (a string or a list of messages; optional: system, answer, any columns the rewards read)"


@dataclass
class PromptExample:
    """A tokenized prompt (`input_ids`, the template's special tokens included), its row's columns, its text."""

    input_ids: list[int]
    source: str
    prompt: str
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Prompt tokens (what length-grouped batching sorts by)."""
        return len(self.input_ids)

    @property
    def labels(self) -> list[int]:
        """No prompt token is trained (grpo trains its sampled completions): every label is -100."""
        return [-100] * len(self.input_ids)

    @property
    def answer(self) -> str | None:
        value = self.columns.get("answer")
        return value if isinstance(value, str) else None


def prompt_text(row: dict, source: str, tokenizer: Any) -> str:
    """The row's prompt rendered for generation (chat template + generation prompt)."""
    if "prompt" not in row:
        have = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{source}: missing field 'prompt' (format prompt needs {FIELDS}; row has {have})")
    return render(_prompt_messages(row, source), tokenizer, True, source)


def encode_prompt_row(row: dict, source: str, tokenizer: Any, max_length: int) -> tuple[PromptExample, bool]:
    """(example, was its prompt cut to max_length) for one row; DataError naming `source` on a bad row."""
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DataError(f"{source}: field 'answer' must be a string (format prompt), got {type(answer).__name__}")
    text = prompt_text(row, source, tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    truncated = len(ids) > max_length
    if truncated:
        ids = ids[-max_length:]
    return PromptExample(ids, source, text, dict(row)), truncated
