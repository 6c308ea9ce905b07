"""The validation set's fingerprint: which rows a run's val_loss was measured on.

`ftkit compare` puts runs side by side only when their val losses are measured on the same
rows; training records this fingerprint in summary.json (facts.val_sha256) for that check.
"""

from __future__ import annotations

import hashlib
import json

from ftkit.data.splits import read_key_rows, split_rows
from ftkit.errors import DataError
from ftkit.recipe.schema import DataSection


def val_fingerprint_or_none(data: DataSection, seed: int) -> str | None:
    """`val_fingerprint`, or None when the files cannot be read any more (moved or deleted while the
    run trained): the run's facts must still be written."""
    try:
        return val_fingerprint(data, seed)
    except (DataError, OSError):
        return None


def val_fingerprint(data: DataSection, seed: int) -> str | None:
    """sha256 of the validation rows (their fields, in order) and the format they are read in;
    None when the run has no validation set.

    The rows are those `load_splits` validates on: data.val, or the seeded val_fraction of
    data.train. The rows' text is hashed, not their tokens, so runs of different models on
    the same rows share a fingerprint.
    """
    if data.val is not None:
        rows = read_key_rows("data.val", data.val)
    elif data.val_fraction > 0:
        rows = split_rows(read_key_rows("data.train", data.train)[: data.max_samples], data.val_fraction, seed)[1]
    else:
        return None
    digest = hashlib.sha256(f"format={data.format}\n".encode())
    for row, _ in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
