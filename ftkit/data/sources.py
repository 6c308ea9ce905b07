"""Data files → rows, each with the `path:line` it came from (for error messages).

Supported: .jsonl (one object per line), .json (an array of objects, or JSON lines),
.csv (header row, every cell read as a string) and .parquet.

JSON is parsed with the standard library, object by object, so a malformed line is
reported where it is (`data/train.jsonl:17: not valid JSON ...`) rather than as an
Arrow error about a whole block. CSV and Parquet go through `datasets`, in memory,
with a throw-away cache directory so nothing lingers in ~/.cache.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import datasets

from ftkit.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Row = tuple[dict, str]


def read_rows(path: str) -> list[Row]:
    """All rows of a data file as `(row, "path:line")`; DataError if the file is missing or malformed.

    Line numbers are 1-based lines of the file; CSV row i (0-based, after the header) is line i+2,
    Parquet row i is reported as line i+1 (a Parquet file has no lines; this is the row number).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use {', '.join(SUFFIXES)}")
    if not file.is_file():
        raise DataError(f"{path}: file not found")
    if suffix == ".csv":
        rows = _read_csv(file)
    elif suffix == ".parquet":
        rows = _read_parquet(file)
    else:
        rows = _read_json(file)
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty")
    return rows


def _read_json(file: Path) -> list[Row]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text ({err.reason}); save the file as UTF-8") from None
    # a .json file may hold an array of objects or JSON lines; .jsonl always holds lines
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _read_json_array(file, text)
    return _read_json_lines(file, text)


def _read_json_lines(file: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{file}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"{err.msg} at column {err.colno}"
            raise DataError(f"{source}: not valid JSON ({problem}); fix or remove the line") from None
        rows.append((_expect_object(row, source), source))
    return rows


def _read_json_array(file: Path, text: str) -> list[Row]:
    """Decode the array element by element, so each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    rows = []
    pos = _skip_space(text, text.index("[") + 1)
    if text.startswith("]", pos):
        return rows
    while True:
        source = f"{file}:{text.count(chr(10), 0, pos) + 1}"
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{file}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the array element"
            ) from None
        rows.append((_expect_object(row, source), source))
        end, pos = pos, _skip_space(text, pos)
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            # a missing comma is reported where the element before it ends
            line = text.count("\n", 0, end) + 1
            raise DataError(f"{file}:{line}: not valid JSON (expected ',' or ']' between array elements)")
        pos = _skip_space(text, pos + 1)
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _expect_object(row: object, source: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object (one example), got {type(row).__name__}")
    return row


def _read_csv(file: Path) -> list[Row]:
    with file.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        return []
    # every cell a string ("007" stays "007"), and an empty cell is "" rather than NaN
    features = datasets.Features({name: datasets.Value("string") for name in header})
    table = _load_in_memory(datasets.Dataset.from_csv, file, features=features, keep_default_na=False)
    return [(row, f"{file}:{i + 2}") for i, row in enumerate(table)]


def _read_parquet(file: Path) -> list[Row]:
    table = _load_in_memory(datasets.Dataset.from_parquet, file)
    return [(row, f"{file}:{i + 1}") for i, row in enumerate(table)]


def _load_in_memory(reader, file: Path, **kwargs) -> list[dict]:
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="ftkit-data-") as cache_dir:
        try:
            return reader(str(file), keep_in_memory=True, cache_dir=cache_dir, **kwargs).to_list()
        except Exception as err:  # pandas/arrow raise many types; all mean "this file cannot be read"
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{file}: cannot read ({message})") from err
