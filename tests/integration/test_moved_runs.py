"""Run directories that move: `cp -r` or `mv` a run, then eval / generate / merge it where it is now,
and `--resume` it from its own recipe.yaml. The run's own base/ is authoritative over the absolute
path adapter_config.json recorded when it was trained."""

from __future__ import annotations

import json
import shutil

from tests.support.helpers import read_metrics, run_cli
from tests.support.resume_helpers import train


def test_a_copied_then_moved_run_evaluates_generates_and_merges(trained_runs, tmp_path):
    original = trained_runs["lora"]
    copied = tmp_path / "copied" / "lora"
    shutil.copytree(original, copied)
    moved = tmp_path / "elsewhere" / "lora"
    moved.parent.mkdir()
    shutil.move(copied, moved)  # the copy's recorded base (the original's base/) is not the copy's own
    recorded = json.loads((moved / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((original / "base").resolve())

    code, out, err = run_cli("eval", str(moved), "--json", "--no-generation")
    assert code == 0, err
    result = json.loads(out)
    assert result["tuned"]["loss"] > 0
    code, out, err = run_cli("generate", str(moved), "--prompt", "Extract the attributes.", "--max-new-tokens", "4")
    assert code == 0, err
    code, _, err = run_cli("merge", str(moved), "--out", str(tmp_path / "merged"), "--samples", "2")
    assert code == 0, err
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["base"] == str((moved / "base").resolve())


def test_a_copied_run_resumes_where_it_is_now(tmp_path, tiny_data):
    recipe = {"train": {"max_steps": 6, "save_every": 2, "samples": 0}}
    code, err, run_dir = train(tmp_path, tiny_data, "first", fault="sigterm@step:2", **recipe)
    assert code == 143, err
    copy = tmp_path / "copy" / "first"
    shutil.copytree(run_dir, copy)
    code, out, err = run_cli("train", str(copy / "recipe.yaml"), "--resume")
    assert code == 0, err
    assert "resuming from" in err and str(copy) in err
    assert (copy / "final").is_dir() and not (run_dir / "final").exists()  # the original is untouched
    train_records, _ = read_metrics(copy)
    assert [r["step"] for r in train_records] == list(range(1, 7))
