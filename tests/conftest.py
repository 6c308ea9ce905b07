from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_rows, write_jsonl
from tests.trained_runs import trained_runs  # noqa: F401  (session fixture: finished runs, trained on first use)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train.jsonl (64 rows) and val.jsonl (16 rows) of a tiny copy-extraction task."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train.jsonl", make_rows(64, seed=1))
    write_jsonl(root / "val.jsonl", make_rows(16, seed=2))
    return root
