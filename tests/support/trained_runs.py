"""Tiny finished runs shared by the eval / generate / merge / extract tests.

Each run is trained once per test session, on first use, through `ftkit train` as a user
runs it (micro-llama, the tiny extraction task). The LoRA run keeps checkpoints for
`--checkpoint`; the QLoRA run also trains lm_head whole (modules_to_save), as the quickstart
does, and is short because 4-bit matmuls are slow on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import make_recipe, run_cli

RUN_CASES: dict[str, dict] = {
    "lora": {
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"lr": 1e-2, "max_steps": 10, "save_every": 4, "samples": 0},
    },
    "qlora": {
        "method": {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        "train": {"lr": 1e-2, "max_steps": 6, "samples": 0},
    },
    "full": {"method": {"name": "full"}, "train": {"lr": 3e-3, "max_steps": 12, "samples": 0}},
}


class TrainedRuns:
    """`runs["lora"]` → the run directory, trained on first access."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        self._done: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._done:
            recipe = make_recipe(self.root, self.data_dir, name=name, **RUN_CASES[name])
            code, _, err = run_cli("train", str(recipe))
            assert code == 0, err
            self._done[name] = self.root / "runs" / name
        return self._done[name]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, tiny_data) -> TrainedRuns:
    return TrainedRuns(tmp_path_factory.mktemp("trained"), tiny_data)
