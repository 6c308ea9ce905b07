"""`ftkit train` with the speed and memory knobs on, as a user runs it: packing with
checkpoint offload learns, and summary.json carries the speed facts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import make_recipe, read_metrics, run_cli


def test_packed_offloaded_run_learns_and_reports_speed(tmp_path, tiny_data):
    recipe = make_recipe(
        tmp_path,
        tiny_data,
        name="packed",
        model={"name": "builtin:micro-llama", "gradient_checkpointing": "offload"},
        data={"packing": True, "max_length": 256},
        train={"batch_size": 3, "max_steps": 20},
    )
    code, out, err = run_cli("train", str(recipe))
    assert code == 0, err
    assert out == "" and "packed rows" in err
    run_dir = tmp_path / "runs" / "packed"
    train, val = read_metrics(run_dir)
    losses = [r["loss"] for r in train]
    assert sum(losses[-5:]) / 5 <= 0.9 * sum(losses[:5]) / 5
    facts = json.loads((run_dir / "summary.json").read_text())["facts"]
    # 64 examples of ~80 tokens: about 3 fit a 256-token row
    assert facts["packing"]["enabled"] and facts["packing"]["rows"] <= facts["train_examples"] / 2.5
    assert 0.7 < facts["packing"]["efficiency"] <= 1.0
    # a micro-step of 3 packed rows holds ~9 examples (the epoch's last batch may hold one row)
    assert sorted(r["tokens"] for r in train)[len(train) // 2] > 3 * 2 * 70
    assert facts["train_tokens_per_s"] > facts["tokens_per_s"] > 0  # step time excludes loading and eval
    assert facts["peak_rss_bytes"] > 100 * 2**20
    assert facts["mfu"] is None  # CPU: no peak FLOP/s to compare against


ROOT = Path(__file__).resolve().parents[2]


def test_readme_plan_commands_run(smollm2, monkeypatch):
    """docs/performance.md's `ftkit plan` lines, as written (the quickstart recipe on a 4090 and an H100)."""
    from tests.integration.test_readme import DOCS, blocks

    block = next(b for b in blocks("", DOCS / "performance.md") if b.startswith("ftkit plan"))
    shown = [line.split("#")[0].split(">")[0].split() for line in block.splitlines()]
    zero3 = ("--set", "distributed.strategy=deepspeed", "--set", "distributed.zero_stage=3")
    assert shown == [
        ["ftkit", "plan", "recipes/quickstart.yaml", "--gpu", "4090"],
        ["ftkit", "plan", "recipes/quickstart.yaml", "--gpu", "h100-80gb", "--json"],
        ["ftkit", "plan", "recipes/quickstart.yaml", "--gpu", "4090", "--nproc", "4", *zero3],
    ]
    monkeypatch.chdir(ROOT)
    code, out, err = run_cli("plan", "recipes/quickstart.yaml", "--gpu", "4090")
    assert (code, out) == (0, "") and "fits 4090" in err
    code, out, err = run_cli("plan", "recipes/quickstart.yaml", "--gpu", "h100-80gb", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["wall_s"] > 0  # epochs over the shipped data: a step count
    code, out, err = run_cli("plan", "recipes/quickstart.yaml", "--gpu", "4090", "--nproc", "4", *zero3)
    assert (code, out) == (0, "") and "(4 × deepspeed ZeRO-3)" in err and "fits 4090" in err


@pytest.mark.slow  # four child processes train a toy model: a few minutes on 2 cores
def test_bench_gpu_path_runs_on_cpu_at_toy_size(tmp_path):
    """scripts/bench.py's GPU code path (random-init model of a given shape, full rows, plain vs ftkit)."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", "gpu", "--allow-cpu", "--case", "toy-lora", "--steps", "3",
         "--skip", "1", "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {r["runner"] for r in results} >= {"plain", "ftkit"}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in results), results
