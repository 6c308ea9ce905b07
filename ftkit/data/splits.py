"""The recipe's data section → tokenized train and validation examples, with counts.

load_splits(data, tokenizer, seed) -> Splits     data.train (and data.val / val_fraction), as data.format says
load_file(key, path, data, tokenizer, labels)    every row of one more file, tokenized the same way
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.data.classification import ClassExample, classification_stats, encode_rows, label_names
from ftkit.data.encode import IGNORE, Example, encode_row
from ftkit.data.preference import PreferencePair, encode_pair
from ftkit.data.prompt_rows import PromptExample, encode_prompt_row
from ftkit.data.sources import SUFFIXES, Row, read_rows
from ftkit.errors import DataError
from ftkit.recipe.schema import DataSection


@dataclass
class Splits:
    """Train and validation examples, and `stats`: n_train, n_val, train_tokens, train_target_tokens,
    val_tokens, truncated_train, truncated_val (examples cut to max_length), max_length, format."""

    train: list[Example] | list[PreferencePair] | list[ClassExample] | list[PromptExample]
    val: list[Example] | list[PreferencePair] | list[ClassExample] | list[PromptExample]
    stats: dict
    labels: list[str] | None = None  # format classification: the class names, in id order


def load_splits(data: DataSection, tokenizer: Any, seed: int) -> Splits:
    """Read, check, split and tokenize the data as the recipe says.

    `max_samples` keeps the first N rows of data.train, before any split. Validation is
    data.val, or a seeded `val_fraction` of those rows (at least one row each side; both
    keep file order), or nothing.
    """
    rows = read_key_rows("data.train", data.train)[: data.max_samples]
    if data.val is not None:
        train_rows, val_rows = rows, read_key_rows("data.val", data.val)
    elif data.val_fraction > 0:
        train_rows, val_rows = split_rows(rows, data.val_fraction, seed)
    else:
        train_rows, val_rows = rows, []
    if data.format == "classification":
        return _classification_splits(train_rows, val_rows, data, tokenizer)
    train, truncated_train = _encode_all(train_rows, data, tokenizer)
    val, truncated_val = _encode_all(val_rows, data, tokenizer)
    stats = {
        "n_train": len(train),
        "n_val": len(val),
        "train_tokens": sum(len(seq.input_ids) for seq in sequences(train)),
        "train_target_tokens": sum(label != IGNORE for seq in sequences(train) for label in seq.labels),
        "val_tokens": sum(len(seq.input_ids) for seq in sequences(val)),
        "truncated_train": truncated_train,
        "truncated_val": truncated_val,
        "max_length": data.max_length,
        "format": data.format,
    }
    return Splits(train=train, val=val, stats=stats)


def _classification_splits(train_rows: list[Row], val_rows: list[Row], data: DataSection, tokenizer: Any) -> Splits:
    labels = label_names(train_rows, data.labels)
    train, truncated_train = encode_rows(train_rows, labels, tokenizer, data.max_length, "data.train")
    val, truncated_val = encode_rows(val_rows, labels, tokenizer, data.max_length, "data.train")
    stats = classification_stats(train, val, labels, (truncated_train, truncated_val), data.max_length)
    return Splits(train=train, val=val, stats=stats, labels=labels)


def load_file(key: str, path: str, data: DataSection, tokenizer: Any, labels: list[str] | None = None) -> list:
    """Every row of the file `path` (the first `data.max_samples`), tokenized as `data` says; errors name `key`.

    Format classification: the class ids are those of `labels` (the class names something was
    trained on; a label outside them is an error naming its row), else of the file's own labels.
    """
    rows = read_key_rows(key, path)[: data.max_samples]
    if data.format == "classification":
        names = labels if labels is not None else label_names(rows, data.labels)
        return encode_rows(rows, names, tokenizer, data.max_length, "the run's data.train")[0]
    return _encode_all(rows, data, tokenizer)[0]


def check_data_file(key: str, path: str) -> None:
    """DataError naming `key` (data.train, --data) when `path` is missing or not a supported file type."""
    file = Path(path)
    if file.suffix.lower() not in SUFFIXES:
        raise DataError(f"{key}: unsupported file type {file.suffix or '(none)'!r} ({path}); use {', '.join(SUFFIXES)}")
    if not file.is_file():
        raise DataError(f"{key}: file not found: {path} (relative paths start at {Path.cwd()})")


def read_key_rows(key: str, path: str) -> list[Row]:
    """`read_rows(path)`, with a missing or unsupported file reported against `key`."""
    check_data_file(key, path)
    return read_rows(path)


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, val): round(fraction * n) rows, at least 1, drawn with random.Random(seed); file order kept."""
    if len(rows) < 2:
        raise DataError(f"data.val_fraction: {fraction} needs at least 2 rows to split, the file has {len(rows)}")
    n_val = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    val_index = set(random.Random(seed).sample(range(len(rows)), n_val))
    train = [row for i, row in enumerate(rows) if i not in val_index]
    val = [row for i, row in enumerate(rows) if i in val_index]
    return train, val


def sequences(examples: list[Example] | list[PreferencePair]) -> list[Example]:
    """Every tokenized sequence: the examples themselves, or both sides of each pair."""
    return [seq for ex in examples for seq in ((ex.chosen, ex.rejected) if isinstance(ex, PreferencePair) else (ex,))]


def _encode_all(rows: list[Row], data: DataSection, tokenizer: Any) -> tuple[list, int]:
    examples, truncated = [], 0
    for row, source in rows:
        if data.format == "preference":
            example, was_truncated = encode_pair(row, source, tokenizer, data.max_length)
        elif data.format == "prompt":
            example, was_truncated = encode_prompt_row(row, source, tokenizer, data.max_length)
        else:
            example, was_truncated = encode_row(
                row, source, data.format, tokenizer, data.max_length, data.train_on_prompt
            )
        examples.append(example)
        truncated += was_truncated
    return examples, truncated
