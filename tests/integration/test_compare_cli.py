"""`ftkit compare`: two tiny runs side by side (files, table, verdict, --json, --html, eval metrics),
and its refusals (exit 2, nothing written): a folder that is no run, another task, another val set,
a run without the val-set fingerprint, an existing --out."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread

from tests.support.helpers import make_recipe, make_rows, run_cli, write_jsonl


def _train(tmp: Path, data: Path, name: str, **train) -> Path:
    recipe = make_recipe(tmp, data, name=name, train={"max_steps": 6, "eval_every": 3, "samples": 0, **train})
    code, _, err = run_cli("train", str(recipe))
    assert code == 0, err
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    """Two finished micro-llama LoRA runs on the same data, a high and a low learning rate."""
    tmp = tmp_path_factory.mktemp("compare")
    return _train(tmp, tiny_data, "fast", lr=1e-2), _train(tmp, tiny_data, "slow", lr=1e-3)


def test_compare_writes_table_curves_and_verdict(two_runs, tmp_path):
    fast, slow = two_runs
    out = tmp_path / "cmp"
    code, stdout, err = run_cli("compare", str(fast), str(slow), "--out", str(out), "--html", "--json")
    assert code == 0, err
    table = json.loads(stdout)  # the whole of stdout is the JSON table
    assert table == json.loads((out / "compare.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.json", "compare.md", "compare.png"]
    rows = {r["run"]: r for r in table["runs"]}
    assert set(rows) == {"fast", "slow"} and table["task"] == "causal_lm"
    for name, run in (("fast", fast), ("slow", slow)):
        summary = json.loads((run / "summary.json").read_text())
        assert rows[name]["best_val_loss"] == summary["best_val_loss"]
        assert rows[name]["trainable_params"] == summary["facts"]["trainable_params"] > 0
        assert rows[name]["method"] == "lora" and rows[name]["rank"] == 8
        assert rows[name]["artifact_bytes"] > 0 and rows[name]["peak_mem_bytes"] > 0
    # 6 steps at lr 1e-2 learn more than at 1e-3 on this task: the verdict says so, with the gap
    assert rows["fast"]["best_val_loss"] < rows["slow"]["best_val_loss"]
    assert table["verdict"][0].startswith("fast has the lowest best val_loss")
    assert table["verdict"][0] in err  # the verdict is shown to people on stderr
    markdown = (out / "compare.md").read_text()
    assert "| fast | lora r8 |" in markdown and "![train loss and val_loss](compare.png)" in markdown
    picture = imread(out / "compare.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 500  # 4 panels: loss / val_loss × step / tokens
    page = (out / "compare.html").read_text()
    embedded = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(embedded) == (out / "compare.png").read_bytes()  # self-contained


def test_compare_shows_the_newest_eval_metrics(two_runs, tmp_path):
    for run in two_runs:
        code, _, err = run_cli("eval", str(run), "--max-samples", "4", "--max-new-tokens", "8")
        assert code == 0, err
    code, stdout, err = run_cli("compare", *map(str, two_runs), "--out", str(tmp_path / "cmp"), "--json")
    assert code == 0, err
    rows = json.loads(stdout)["runs"]
    for row, run in zip(rows, two_runs, strict=True):
        newest = json.loads(sorted(run.glob("eval-*.json"))[-1].read_text())
        assert row["eval"]["exact_match"] == newest["tuned"]["exact_match"]
        assert row["eval"]["n_examples"] == 4
    assert "| exact_match |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "exact_match" in " ".join(json.loads(stdout)["verdict"])
    for run in two_runs:  # leave the shared runs as the other tests expect them
        for path in run.glob("eval-*.json"):
            path.unlink()


def _refused(*args: str, says: str, out: Path) -> None:
    code, stdout, err = run_cli("compare", *args, "--out", str(out))
    assert code == 2, err
    assert stdout == "" and len(err.strip().splitlines()) == 1, err
    assert says in err, err
    assert not out.exists()


def test_a_folder_that_is_no_run_is_refused_by_name(two_runs, tmp_path):
    plain = tmp_path / "photos"
    plain.mkdir()
    _refused(str(two_runs[0]), str(plain), says=f"{plain}: not a run directory", out=tmp_path / "cmp")
    _refused(str(two_runs[0]), says="at least two run directories", out=tmp_path / "cmp")


def test_runs_on_another_val_set_are_refused(two_runs, tmp_path, tiny_data):
    other_data = tmp_path / "data"
    other_data.mkdir()
    shutil.copy(tiny_data / "train.jsonl", other_data / "train.jsonl")
    write_jsonl(other_data / "val.jsonl", make_rows(16, seed=9))  # other val rows
    other = _train(tmp_path, other_data, "other", max_steps=2)
    _refused(str(two_runs[0]), str(other), says="measured on other validation rows", out=tmp_path / "cmp")


def _copy_with_facts(run: Path, tmp: Path, **facts) -> Path:
    copy = tmp / f"copy-{len(list(tmp.iterdir()))}"
    shutil.copytree(run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    for key, value in facts.items():
        if value is None:
            summary["facts"].pop(key)
        else:
            summary["facts"][key] = value
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def test_another_task_and_runs_without_the_fingerprint_are_refused(two_runs, tmp_path):
    preference = _copy_with_facts(two_runs[1], tmp_path, task="preference")
    _refused(str(two_runs[0]), str(preference), says="task preference", out=tmp_path / "cmp")
    older = _copy_with_facts(two_runs[1], tmp_path, val_sha256=None, task=None)  # a run from before compare
    _refused(str(two_runs[0]), str(older), says="trained by an older ftkit", out=tmp_path / "cmp")


def test_an_existing_out_is_kept_without_overwrite(two_runs, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run_cli("compare", *map(str, two_runs), "--out", str(out))
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, _, err = run_cli("compare", *map(str, two_runs), "--out", str(out), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]
