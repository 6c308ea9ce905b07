"""docs/moe.md's flow runs as written: make the data, two experts, the merge, router training, eval.

The commands are read from the page's bash block and run in order in a scratch copy of the repo's
data and recipes, on builtin:micro-llama instead of SmolLM2 and for 2 steps each (the page's
figures come from the real runs; this checks that every command works and what each leaves)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.test_readme import blocks
from tests.support.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "moe.md"
SHORT = ["--set", "model.name=builtin:micro-llama", "--set", "train.max_steps=2", "--set", "data.max_samples=16"]


def commands() -> list[list[str]]:
    (block,) = blocks("bash", PAGE)
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.mark.slow  # ~20 s of CPU: seven commands, three trainings
def test_moe_page_flow_runs(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copytree(ROOT / "data" / "quickstart", tmp_path / "data" / "quickstart")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    (tmp_path / "merges").symlink_to(ROOT / "merges")
    monkeypatch.chdir(tmp_path)
    steps = commands()
    assert [s[:2] for s in steps] == [
        ["python", "scripts/make_moe_data.py"],
        ["ftkit", "train"],
        ["ftkit", "train"],
        ["ftkit", "merge"],
        ["ftkit", "train"],
        ["ftkit", "eval"],
        ["ftkit", "eval"],
    ]
    for step in steps:
        if step[0] == "python":
            subprocess.run([sys.executable, *step[1:]], check=True)
            continue
        args = step[1:]
        if args[0] == "train" and "moe_router" in args[1]:
            args += ["--set", "train.max_steps=2"]  # the MoE is already micro-sized
        elif args[0] == "train":
            args += SHORT
        elif args[0] == "merge":  # the experts' base is the runs' micro-llama, not SmolLM2
            config = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
            config["base"] = "runs/moe-extract/base"
            Path("moe.yaml").write_text(yaml.safe_dump(config))
            args[args.index("--config") + 1] = "moe.yaml"
        elif args[0] == "eval":
            args += ["--max-samples", "4"]
        code, _, err = run_cli(*args)
        assert code == 0, (step, err)
    assert json.loads(Path("data/moe/val.jsonl").read_text().splitlines()[1])["domain"] == "describe"
    report = json.loads(Path("runs/moe/merge_report.json").read_text())
    assert all(check["rel_logit_diff"] <= 1e-4 for check in report["checks"])
    routing = json.loads(Path("runs/moe-router/routing.json").read_text())
    assert set(routing["after"]) == {"extract", "describe"}
    assert "## Routing" in Path("runs/moe-router/report.md").read_text()
    assert len(list(Path("runs/moe-router").glob("eval-*.json"))) == 2
