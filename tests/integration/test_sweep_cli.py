"""`ftkit sweep`: a bad grid is refused before anything runs; a 2-point sweep skips the point that
already completed, trains the other in a child `ftkit train` and compares both; a point that
crashes does not stop the sweep, and running it again resumes it (slow). The study's script
validates every run it would make."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.faults import subprocess_env
from tests.support.helpers import make_recipe, run_cli

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "recipes" / "study"
# 6 steps of a micro-llama, a checkpoint every 3: enough for the loss to fall and to resume mid-run
SETS = ["--set", "train.max_steps=6", "--set", "train.save_every=3", "--set", "train.samples=0"]


@pytest.fixture
def child_env(monkeypatch):
    """The child `python -m ftkit train` imports ftkit from this checkout (as the sweep runs it)."""
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)


def test_a_bad_grid_key_or_value_is_refused_before_anything_runs(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tiny_data)
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(
        "sweep", str(recipe), "--grid", "train.lerning_rate=1e-4,3e-4", "--grid", "method.r=8,x", "--out", str(out)
    )
    assert code == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert lines == [  # one line per problem, the unknown key once although it has two values
        "--grid train.lerning_rate=1e-4: train.lerning_rate: unknown key (did you mean train.lr?)",
        lines[1],
    ]
    assert lines[1].startswith("--grid method.r=x: method.r:"), lines[1]
    assert not out.exists()
    code, _, err = run_cli("sweep", str(recipe), "--grid", "train.lr", "--out", str(out))
    assert code == 2 and "--grid train.lr: expected key.path=value1,value2" in err and not out.exists()


def test_sweep_skips_a_completed_point_trains_the_other_and_compares(tmp_path, tiny_data, child_env):
    recipe = make_recipe(tmp_path, tiny_data)
    out = tmp_path / "sweep"
    # the first point, trained earlier as a user (or an earlier sweep) would have
    code, _, err = run_cli("train", str(recipe), *SETS, "--set", "train.lr=1e-2", "--output-dir", str(out / "lr=1e-2"))
    assert code == 0, err
    before = (out / "lr=1e-2" / "summary.json").read_text()
    code, stdout, err = run_cli(
        "sweep", str(recipe), "--grid", "train.lr=1e-2,1e-3", *SETS, "--out", str(out), "--dry-run"
    )
    assert code == 0, err
    assert stdout.splitlines() == [f"skip\t{out / 'lr=1e-2'}", f"train\t{out / 'lr=1e-3'}"]
    code, _, err = run_cli("sweep", str(recipe), "--grid", "train.lr=1e-2,1e-3", *SETS, "--out", str(out))
    assert code == 0, err
    assert "[1/2] lr=1e-2: completed earlier, skipped" in err
    assert (out / "lr=1e-2" / "summary.json").read_text() == before  # not trained again
    summary = json.loads((out / "lr=1e-3" / "summary.json").read_text())
    assert summary["facts"]["status"] == "completed" and summary["facts"]["lr"] == 1e-3
    assert summary["final_loss"] < summary["first_loss"]
    table = json.loads((out / "compare.json").read_text())
    assert [r["run"] for r in table["runs"]] == ["lr=1e-2", "lr=1e-3"]
    assert (out / "compare.md").is_file() and (out / "compare.png").stat().st_size > 0


def test_a_changed_recipe_does_not_reuse_the_sweeps_runs(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tiny_data)
    code, _, err = run_cli("train", str(recipe), *SETS, "--output-dir", str(tmp_path / "sweep" / "lr=1e-2"))
    assert code == 0, err
    code, _, err = run_cli("sweep", str(recipe), "--grid", "train.lr=1e-2", "--out", str(tmp_path / "sweep"))
    assert code == 2 and "was trained from another recipe (train.max_steps" in err, err


@pytest.mark.slow
def test_a_crashed_point_does_not_stop_the_sweep_and_a_rerun_resumes_it(tmp_path, tiny_data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_data)
    out = tmp_path / "sweep"
    args = ("sweep", str(recipe), "--grid", "train.lr=1e-2,1e-3", *SETS, "--out", str(out))
    for key, value in subprocess_env("kill@step:4").items():  # every point is killed (kill -9) after step 4
        monkeypatch.setenv(key, value)
    code, _, err = run_cli(*args)
    assert code == 1 and "2 of 2 points failed" in err, err
    assert "[2/2] lr=1e-3: training" in err  # the second point ran after the first crashed
    assert not (out / "compare.md").exists()
    monkeypatch.delenv("FTKIT_TEST_FAULT")
    code, stdout, err = run_cli(*args, "--dry-run")
    assert stdout.splitlines() == [f"resume\t{out / 'lr=1e-2'}", f"resume\t{out / 'lr=1e-3'}"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    for point in ("lr=1e-2", "lr=1e-3"):
        facts = json.loads((out / point / "summary.json").read_text())["facts"]
        assert facts["status"] == "completed" and facts["resumed_from_step"] == 3 and facts["steps"] == 6
    assert (out / "compare.md").is_file()
    code, _, err = run_cli(*args)  # a third time: nothing left to train
    assert code == 0 and err.count("completed earlier, skipped") == 2


def _study_grids() -> dict[str, str]:
    text = (STUDY / "run.sh").read_text()
    return dict(re.findall(r"\[([\w-]+)\]=([\d.e,-]+)", text))


def test_the_study_sweeps_validate(tmp_path):
    grids = _study_grids()
    assert sorted(grids) == sorted(p.stem for p in STUDY.glob("*.yaml"))
    for method, lrs in grids.items():
        assert len(lrs.split(",")) == 3
        code, stdout, err = run_cli(
            "sweep",
            str(STUDY / f"{method}.yaml"),
            "--grid",
            f"train.lr={lrs}",
            "--out",
            str(tmp_path / method),
            "--dry-run",
        )
        assert code == 0, err
        assert len(stdout.splitlines()) == 3 and all(line.startswith("train\t") for line in stdout.splitlines())
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_study_script_dry_runs(tmp_path, child_env):
    result = subprocess.run(
        ["bash", str(STUDY / "run.sh"), str(tmp_path / "study"), "--dry-run"],
        env={**subprocess_env(), "FTKIT": "python -m ftkit"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 12 and not (tmp_path / "study").exists()


def test_the_sweep_example_in_the_docs_validates(monkeypatch):
    """docs/compare.md's sweep example, as written (its --dry-run line: it validates all 4 points, writes nothing)."""
    page = (ROOT / "docs" / "compare.md").read_text()
    line = next(line for line in page.splitlines() if line.startswith("ftkit sweep recipes/") and "--dry-run" in line)
    monkeypatch.chdir(ROOT)
    args = line.split()[1:]
    out = Path(args[args.index("--out") + 1])
    existed = out.exists()
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert [row.split("\t")[0] for row in stdout.splitlines()] == ["train"] * 4 or existed
    assert out.exists() == existed  # a dry run writes nothing
