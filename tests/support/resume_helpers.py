"""Helpers for the reliability tests: interrupted runs, and what "the same run" means.

Two runs are the same when their metrics (every logged number except wall-clock ones),
the examples of every training micro-batch in order, and the final tensors are equal,
bit for bit: CPU, fp32, dropout > 0 so that the RNG state matters.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.faults import injected, subprocess_env
from tests.support.helpers import make_recipe, run_cli

ROOT = Path(__file__).resolve().parents[2]
#: metrics fields that measure the machine, not the training
WALL_CLOCK_FIELDS = {"tokens_per_s", "mem_bytes"}

#: 64 train rows at batch_size 8 = 8 micro-batches per epoch; dropout 0.1 makes every step draw random numbers
BASE = {
    "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
    "train": {
        "max_steps": 12,
        "batch_size": 8,
        "save_every": 2,
        "keep_last": 10,
        "eval_every": 3,
        "samples": 0,
        "scheduler": "cosine",
        "warmup_steps": 2,
    },
}


def sections(**changes: dict) -> dict:
    """BASE with some keys of its sections replaced: sections(train={"grad_accum": 2})."""
    out = {key: dict(value) for key, value in BASE.items()}
    for key, value in changes.items():
        replaces_method = key == "method" and "name" in value  # another method's keys do not mix
        out[key] = dict(value) if replaces_method else {**out.get(key, {}), **value}
    return out


def train(tmp: Path, data: Path, name: str, *args: str, fault: str | None = None, **recipe) -> tuple:
    """`ftkit train` in-process on a recipe named `name`; (exit code, stderr, run dir)."""
    path = tmp / f"{name}.yaml"
    if not path.exists():
        make_recipe(tmp, data, name=name, **recipe)
    with injected(fault):
        code, out, err = run_cli("train", str(path), *args)
    assert out == "", out  # stdout carries only requested output, and train requests none
    return code, err, tmp / "runs" / name


def train_subprocess(tmp: Path, data: Path, name: str, fault: str, **recipe) -> subprocess.CompletedProcess:
    """`python -m ftkit train` in a child process that fires `fault` (for kill -9)."""
    path = make_recipe(tmp, data, name=name, **recipe)
    return subprocess.run(
        [sys.executable, "-m", "ftkit", "train", str(path)],
        cwd=ROOT,
        env=subprocess_env(fault),
        capture_output=True,
        text=True,
        timeout=300,
    )


def trajectory(run_dir: Path) -> list[dict]:
    """Every metrics record, wall-clock fields removed."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_FIELDS} for line in lines if line]


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    file = final / "adapter_model.safetensors"
    if (final / "bottleneck_model.safetensors").is_file():  # method adapter / adapter_fusion
        file = final / "bottleneck_model.safetensors"
    return load_file(file if file.is_file() else final / "model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different[:5]}"


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Losses, LRs, grad norms, val losses, epochs, token counts and final tensors all bit-identical."""
    assert trajectory(resumed) == trajectory(reference)
    assert_same_tensors(final_tensors(resumed), final_tensors(reference))
    assert json.loads((resumed / "summary.json").read_text())["facts"]["status"] == "completed"


@contextmanager
def recorded_batches() -> Iterator[list[list[str]]]:
    """Collect the `file:line` of every example of every training micro-batch, in order.

    Wraps ftkit's own collate while inside; eval batches (built under no_grad) are left out.
    """
    from ftkit.tasks.causal_lm import SFT

    seen: list[list[str]] = []
    collate = SFT.collate

    def recording(self, examples, pad_id):
        if torch.is_grad_enabled():
            seen.append([example.source for example in examples])
        return collate(self, examples, pad_id)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SFT, "collate", recording)
        yield seen


def tree_digest(root: Path) -> str:
    """sha256 over every path and file content under `root`: equal digests = an untouched tree."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def reference_runs(tmp_path_factory, data: Path, prefix: str, variants: dict):
    """`get(variant) -> (run_dir, micro-batches)`: the uninterrupted run of a variant (recipe
    sections from `variants`), trained once on first use."""
    made: dict[str, tuple[Path, list]] = {}

    def get(variant: str) -> tuple[Path, list[list[str]]]:
        if variant not in made:
            tmp = tmp_path_factory.mktemp(f"{prefix}-{variant}")
            with recorded_batches() as seen:
                code, err, run_dir = train(tmp, data, variant, **variants[variant])
            assert code == 0, err
            made[variant] = (run_dir, seen)
        return made[variant]

    return get
