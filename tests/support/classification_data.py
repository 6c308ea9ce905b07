"""A tiny classification task for the tests: is the object in the sentence round or angular?

Rows are `classification` format, {"text": "A red ring of size 12.", "label": "round"}, built from
the sentences of `tests.support.helpers.make_rows`: the label follows from the shape word alone, so a
micro model learns it in tens of steps, and the pretrained micro base (tests/pretrained.py),
which learned to copy those shape words, already holds what the head needs.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.helpers import make_rows, write_jsonl

ROUND = {"ring", "disc", "cone"}  # the other shapes (cube, star, arch) are angular


def class_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for row in make_rows(n, seed):
        shape = row["input"].split()[2]  # "A red cube of size 12."
        rows.append({"text": row["input"], "label": "round" if shape in ROUND else "angular"})
    return rows


def write_class_data(root: Path, n_train: int = 64, n_val: int = 32) -> Path:
    write_jsonl(root / "train.jsonl", class_rows(n_train, seed=1))
    write_jsonl(root / "val.jsonl", class_rows(n_val, seed=2))
    return root
