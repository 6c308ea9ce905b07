"""Preference pairs: a row {prompt, chosen, rejected} → two tokenized sequences sharing the prompt.

Row forms (`data.format: preference`), as in TRL's preference datasets:
- plain text: {"prompt": str, "chosen": str, "rejected": str, "system"?: str}; the prompt is
  the user's message, and each answer the assistant's reply;
- conversational: {"prompt": [messages...], "chosen": [{"role": "assistant", "content"}],
  "rejected": [...]}; the prompt may hold several turns and must not end with the assistant.

Both conversations (prompt + chosen, prompt + rejected) go through the chat path of SFT
(`tokenize_conversation`: the tokenizer's chat template, ChatML when it has none), so a model
aligned with DPO after SFT sees exactly the text it was fine-tuned on. Only the final answer
is trained (labels = ids on the answer and its EOS, -100 on the prompt and earlier turns);
its summed log-probability is what every preference loss compares.

A pair is an error naming `file:line` when chosen equals rejected (nothing to prefer), when an
answer is empty, or when truncation to data.max_length leaves either answer with no tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftkit.data.encode import Example, append_eos, finish_example, left_cut, tokenize_conversation
from ftkit.errors import DataError

FIELDS = "prompt, chosen, rejected (strings or message lists; optional: system)"


@dataclass
class PreferencePair:
    """One tokenized pair: the chosen and rejected sequences (each an Example with the answer
    as its only trained tokens) and the `path:line` of its row.

    `ref_logps` holds precomputed reference log-probs (chosen, rejected) when the run uses
    `objective.reference: precompute`, else None.
    """

    chosen: Example
    rejected: Example
    source: str
    ref_logps: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        """Padded width of the pair in a batch (the longer side): what length-grouped batching sorts by."""
        return max(self.chosen.length, self.rejected.length)


def pair_messages(row: dict, source: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen answer, rejected answer) of a preference row, checked."""
    prompt = _prompt_messages(row, source)
    chosen = _answer(row, "chosen", source)
    rejected = _answer(row, "rejected", source)
    if chosen == rejected:
        raise DataError(
            f"{source}: chosen and rejected are the same answer, so there is nothing to prefer; fix or remove the row"
        )
    return prompt, chosen, rejected


def encode_pair(row: dict, source: str, tokenizer: Any, max_length: int) -> tuple[PreferencePair, bool]:
    """(pair, was either side truncated) for one row; DataError naming `source` on a bad pair."""
    prompt, chosen, rejected = pair_messages(row, source)
    encoded = []
    for answer in (chosen, rejected):
        ids, trained = tokenize_conversation([*prompt, {"role": "assistant", "content": answer}], tokenizer, source,
                                             last_turn_only=True)  # fmt: skip
        append_eos(ids, trained, tokenizer)
        encoded.append((ids, trained))
    drop = left_cut([trained for _, trained in encoded], max_length)  # the shared prompt cut alike on both sides
    sides = []
    truncated = False
    for side, (ids, trained) in zip(("chosen", "rejected"), encoded, strict=True):
        example, cut = finish_example(ids, trained, f"{source} ({side})", tokenizer, max_length, drop)
        example.source = source
        sides.append(example)
        truncated |= cut
    return PreferencePair(chosen=sides[0], rejected=sides[1], source=source), truncated


def _prompt_messages(row: dict, source: str) -> list[dict[str, str]]:
    prompt = row.get("prompt")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{source}: field 'system' must be a string (format preference), got {type(system).__name__}")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{source}: field 'prompt' is empty; fill it in or remove the row")
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        messages = [_message(m, f"prompt[{i}]", source) for i, m in enumerate(prompt)]
        if messages[-1]["role"] == "assistant":
            raise DataError(
                f"{source}: the prompt ends with an assistant message; the answers go in 'chosen' and 'rejected'"
            )
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        return messages
    got = "nothing" if prompt is None else "an empty list" if prompt == [] else type(prompt).__name__
    have = ", ".join(sorted(row)) or "none"
    raise DataError(
        f"{source}: field 'prompt' must be a string or a list of messages (format preference needs {FIELDS}); "
        f"got {got} (row has {have})"
    )


def _answer(row: dict, field: str, source: str) -> str:
    """The answer text of `chosen` / `rejected`: a string, or a list holding one assistant message."""
    value = row.get(field)
    if isinstance(value, list) and len(value) == 1:
        message = _message(value[0], f"{field}[0]", source)
        if message["role"] != "assistant":
            raise DataError(f"{source}: {field}[0] has role {message['role']!r}; an answer is the assistant's")
        value = message["content"]
    if not isinstance(value, str):
        if value is None:
            have = ", ".join(sorted(row)) or "none"
            raise DataError(f"{source}: missing field {field!r} (format preference needs {FIELDS}; row has {have})")
        got = f"a list of {len(value)} messages" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{source}: field {field!r} must be a string or a list of one assistant message, got {got}")
    if not value.strip():
        raise DataError(f"{source}: nothing to train on: field {field!r} is empty; fill it in or remove the row")
    return value


def _message(message: Any, where: str, source: str) -> dict[str, str]:
    if not (
        isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
    ):
        raise DataError(f"{source}: {where} must be {{role: string, content: string}}, got {message!r:.80}")
    return {"role": message["role"], "content": message["content"]}
