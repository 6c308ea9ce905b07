"""`ftkit validate` in process: every problem at once on stderr with its line, the resolved recipe on stdout."""

from __future__ import annotations

from ftkit.recipe import load_recipe, parse_recipe
from tests.support.helpers import run_cli, write_file

MINIMAL = "method: {name: lora}\ndata: {train: data.jsonl}\n"


def test_cli_unknown_nested_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_file(tmp_path, MINIMAL + "train:\n  lerning_rate: 3e-4\n")
    code, out, err = run_cli("validate", "recipe.yaml")
    assert code == 2
    assert out == ""
    assert "recipe.yaml:4" in err and "train.lerning_rate" in err and "did you mean train.lr" in err
    assert not (tmp_path / "runs").exists()


def test_cli_reports_several_errors_at_once_with_set(tmp_path):
    path = write_file(tmp_path, MINIMAL + "train:\n  lerning_rate: 3e-4\n  scheduler: no\n")
    code, out, err = run_cli("validate", str(path), "--set", "train.batch_size=0", "--set", "model.dtype=fp32")
    lines = err.splitlines()
    assert code == 2 and out == ""
    assert lines[0].startswith(f"{path}:4: train.lerning_rate: ")
    assert lines[1].startswith(f"{path}:5: train.scheduler: ")
    assert lines[2].startswith("--set train.batch_size=0: train.batch_size: should be greater than or equal to 1")
    assert lines[3].startswith("--set model.dtype=fp32: model.dtype: should be 'auto', 'float32'")
    assert len(lines) == 4


def test_cli_valid_recipe_prints_the_resolved_recipe(tmp_path):
    path = write_file(tmp_path, MINIMAL + "train: {lr: 2e-4}\n", name="quick.yaml")
    code, out, err = run_cli("validate", str(path), "--set", "train.epochs=2")
    assert (code, err) == (0, "")
    assert "output_dir: runs/quick\n" in out
    assert parse_recipe(out).model_dump() == load_recipe(path, ["train.epochs=2"]).model_dump()
