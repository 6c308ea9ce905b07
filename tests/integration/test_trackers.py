"""`train.report_to`: TensorBoard, MLflow and W&B (offline) get the same losses as metrics.jsonl; a tracker
whose extra is missing, or an unknown one, is refused in one line before the run directory exists.
Each tracker's test is skipped when its package is not installed (they are optional extras)."""

from __future__ import annotations

import glob
import importlib.util
import json
from pathlib import Path

import pytest

from ftkit.train import trackers
from tests.support.helpers import make_recipe, read_metrics, run_cli

TRACKERS = [name for name, (module, _) in trackers.REQUIRES.items() if importlib.util.find_spec(module)]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_data):
    if not TRACKERS:
        pytest.skip("no tracker package installed (pip install 'ftkit[tensorboard,mlflow,wandb]')")
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        train = {"max_steps": 6, "eval_every": 3, "samples": 0, "report_to": TRACKERS}
        code, _, err = run_cli("train", str(make_recipe(root, tiny_data, name="tracked", train=train)))
    assert code == 0, err
    run = root / "runs" / "tracked"
    losses, evals = read_metrics(run)
    return run, [(r["step"], r["loss"]) for r in losses], [(r["step"], r["val_loss"]) for r in evals]


def test_tensorboard_event_files_hold_the_losses_of_metrics_jsonl(tracked_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, losses, evals = tracked_run
    events = EventAccumulator(str(run / "logs" / "tensorboard" / "tracked"))
    events.Reload()
    for tag, expected in (("loss", losses), ("val_loss", evals)):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected]
        # event files store float32: equal to 7 significant digits
        assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(got, expected, strict=True))


def test_mlflow_file_store_holds_the_losses_of_metrics_jsonl(tracked_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run, losses, evals = tracked_run
    client = MlflowClient(tracking_uri=(run / "logs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(trackers.PROJECT)
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "tracked" and found.data.params["method.name"] == "lora"
    for key, expected in (("loss", losses), ("val_loss", evals)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
        assert [s for s, _ in history] == [s for s, _ in expected]
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-12)


def test_wandb_offline_run_holds_the_losses_of_metrics_jsonl(tracked_run):
    pytest.importorskip("wandb")
    run, losses, evals = tracked_run
    (offline,) = glob.glob(str(run / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb ships no reader for offline runs (`wandb sync` uploads them); its history records carry each
    # value as JSON text, so every loss of metrics.jsonl must be there, spelled as json writes it
    data = Path(offline).read_bytes()
    for _, value in losses + evals:
        assert json.dumps(value).encode() in data


def test_a_missing_tracker_extra_is_one_line_naming_it_and_no_run_directory(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setitem(trackers.REQUIRES, "mlflow", ("ftkit_no_such_module", "mlflow"))
    recipe = make_recipe(tmp_path, tiny_data, train={"max_steps": 2, "report_to": ["mlflow"]})
    code, out, err = run_cli("train", str(recipe))
    assert (code, out) == (2, "")
    assert (
        err == "error: train.report_to: mlflow is not installed; pip install 'ftkit[mlflow]' (or remove it from "
        "report_to)\n"
    )
    assert not (tmp_path / "runs").exists()


def test_an_unknown_tracker_is_a_recipe_error(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tiny_data, train={"max_steps": 2, "report_to": ["tensorbord"]})
    code, _, err = run_cli("train", str(recipe))
    assert code == 2 and err.count("\n") == 1
    assert "train.report_to" in err and "tensorboard" in err
    assert not (tmp_path / "runs").exists()
