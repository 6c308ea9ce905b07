"""One row → token ids and labels (the loss mask), truncated to max_length.

Labels equal input_ids where the token is trained and are -100 elsewhere. By default
only assistant tokens are trained (completion-only); `train_on_prompt` trains all.
Position 0 is always -100: no token predicts the first one (the model shifts labels
left by one), so counting labels != -100 counts exactly the tokens in the loss.

The sequence always ends with EOS, which is trained: a model that never sees EOS
after an answer never learns to stop. When the rendered text does not end with EOS
(ChatML closes turns with <|im_end|>\\n) EOS is appended; when it ends with EOS plus
trailing whitespace (a template that writes "<|im_end|>\\n" with <|im_end|> as EOS),
the whitespace is dropped so EOS stays last. Truncation keeps that end: a sequence longer than
max_length loses the start of its prompt, so the last answer and its EOS stay whole
(`finish_example`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import takewhile
from typing import Any

from ftkit.data.formats import Span, render_chat, text_of, to_messages
from ftkit.errors import DataError

IGNORE = -100


@dataclass
class Example:
    """A tokenized example: input_ids and labels of equal length (-100 = not trained), and its `path:line`.

    A packed row (ftkit.data.packing) holds several examples end to end; its `position_ids`
    restart at 0 where each example starts, which is what keeps attention inside each one.
    """

    input_ids: list[int]
    labels: list[int]
    source: str
    position_ids: list[int] | None = None

    @property
    def length(self) -> int:
        """Tokens in its forward pass (what length-grouped batching sorts by)."""
        return len(self.input_ids)


def encode_row(
    row: dict, source: str, fmt: str, tokenizer: Any, max_length: int, train_on_prompt: bool
) -> tuple[Example, bool]:
    """(example, was_truncated) for one raw row; DataError when nothing in it would be trained."""
    if fmt == "text":
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        ids = bos + tokenizer.encode(text_of(row, source), add_special_tokens=False)
        trained = [True] * len(ids)
    else:
        ids, trained = tokenize_conversation(to_messages(row, fmt, source), tokenizer, source, last_turn_only=False)
        trained = [train_on_prompt or t for t in trained]
    return finish_example(ids, trained, source, tokenizer, max_length)


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: Any, source: str, last_turn_only: bool
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and whether each is trained: every assistant turn,
    or only the last one (a preference answer, whose earlier turns are part of the prompt)."""
    text, spans = render_chat(messages, tokenizer, source)
    text = _strip_after_eos(text, tokenizer.eos_token)
    return _tokenize_spans(text, spans[-1:] if last_turn_only else spans, tokenizer)


def finish_example(
    ids: list[int], trained: list[bool], source: str, tokenizer: Any, max_length: int, drop: int | None = None
) -> tuple[Example, bool]:
    """Append a trained EOS, mask, fit to max_length: (example, was_truncated).

    A sequence that is too long loses the start of its conversation (the prompt is cut from the
    left), so the last answer and its end-of-turn stay whole: the model still learns to stop. Only
    an answer that alone exceeds max_length is cut at its end, with no end-of-turn forced there
    (that would teach stopping mid-answer). `drop` fixes how many leading tokens go (a preference
    pair cuts its shared prompt alike on both sides). DataError naming `source` when no trained
    token is left."""
    append_eos(ids, trained, tokenizer)
    labels = [tok if t else IGNORE for tok, t in zip(ids, trained, strict=True)]
    truncated = len(ids) > max_length
    if truncated:
        drop = left_cut([trained], max_length) if drop is None else drop
        ids, labels = ids[drop:][:max_length], labels[drop:][:max_length]
    if labels:
        labels[0] = IGNORE
    if all(label == IGNORE for label in labels):
        if truncated:
            raise DataError(
                f"{source}: no answer tokens left after truncation to data.max_length (the answer alone is longer "
                f"and the prompt fills it); raise data.max_length (now {max_length}) or shorten the prompt"
            )
        raise DataError(f"{source}: nothing to train on (the answer is empty); fill it in or remove the row")
    return Example(input_ids=ids, labels=labels, source=source), truncated


def append_eos(ids: list[int], trained: list[bool], tokenizer: Any) -> None:
    """End the sequence with a trained EOS: the conversation ends with the assistant's turn, so its
    closing EOS is the assistant's."""
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        trained.append(True)


def left_cut(sides: list[list[bool]], max_length: int) -> int:
    """How many leading tokens to drop from each of `sides` (the trained flags of sequences that
    share their prompt) so that all fit max_length with their last answer whole and at least one
    token of context before it; 0 when none is too long or some answer alone does not fit (then
    the sequences are cut at their end instead)."""
    need = max(len(trained) for trained in sides) - max_length
    if need <= 0:
        return 0
    starts = [len(trained) - _trailing_true(trained) for trained in sides]
    return need if all(need <= start - 1 for start in starts) else 0


def _trailing_true(flags: list[bool]) -> int:
    return sum(1 for _ in takewhile(bool, reversed(flags)))


def _strip_after_eos(text: str, eos: str | None) -> str:
    stripped = text.rstrip()
    return stripped if eos and stripped.endswith(eos) else text


def _tokenize_spans(text: str, spans: list[Span], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of `text` (no added special tokens) and whether each token starts inside a span.

    The text is tokenized whole, exactly as at generation time, and tokens are matched
    to spans by character offsets; a token that straddles a boundary belongs to the
    side where it starts. Tokenizers without offsets (slow, Python ones) are tokenized
    span by span instead.
    """
    if not getattr(tokenizer, "is_fast", False):
        return _tokenize_pieces(text, spans, tokenizer)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    trained = [any(a <= start < b for a, b in spans) for start, _ in encoding["offset_mapping"]]
    return ids, trained


def _tokenize_pieces(text: str, spans: list[Span], tokenizer: Any) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    cursor = 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, is_span in ((text[cursor:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                ids += piece_ids
                trained += [is_span] * len(piece_ids)
        cursor = max(cursor, b)
    return ids, trained
