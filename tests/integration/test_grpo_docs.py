"""docs/grpo.md's flow runs as written on the packaged real model (SmolLM2-135M-Instruct), shortened to a
step per stage and a few val prompts: SFT → GRPO from the SFT adapter (merged into its base) → eval with
--baseline. Slow (the real model generates on the CPU): the default suite runs the micro-llama checks of
tests/integration/test_train_grpo.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_grpo_flow_of_the_docs(tmp_path, monkeypatch):
    page = (ROOT / "docs" / "grpo.md").read_text()
    for command in ("ftkit train recipes/grpo-sft.yaml", "ftkit train recipes/grpo.yaml", "ftkit eval runs/grpo"):
        assert command in page
    monkeypatch.chdir(ROOT)  # the recipes' data paths are relative to the repository
    val = tmp_path / "val.jsonl"
    val.write_text("".join((ROOT / "data" / "grpo" / "val.jsonl").read_text().splitlines(keepends=True)[:3]))
    sft, grpo = tmp_path / "grpo-sft", tmp_path / "grpo"
    code, _, err = run_cli(
        "train", "recipes/grpo-sft.yaml", "--output-dir", str(sft),
        "--set", "train.max_steps=2", "--set", "data.max_samples=8",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        "train", "recipes/grpo.yaml", "--output-dir", str(grpo),
        "--set", f"model.name={sft / 'final'}", "--set", "train.max_steps=2", "--set", f"data.val={val}",
        "--set", "objective.group_size=2", "--set", "objective.max_new_tokens=12", "--set", "train.samples=1",
    )  # fmt: skip
    assert code == 0, err
    steps = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/field_f1" in r for r in steps if "loss" in r)
    assert "## Reinforcement learning (grpo)" in (grpo / "report.md").read_text()
    code, out, err = run_cli("eval", str(grpo), "--baseline", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"reward", "reward/field_f1", "exact_match"} <= result["tuned"].keys() == result["base"].keys()
    assert os.path.isdir(grpo / "base")  # the SFT adapter merged into its base: the new adapter's base
