"""`train.report_to`: every metrics line also goes to experiment trackers, through accelerate's tracker API
(`accelerate.tracking`: TensorBoardTracker, MLflowTracker, WandBTracker: start, store_init_configuration,
log, finish). Each tracker is an optional extra; a recipe naming one that is not installed is refused
before the run directory exists (`check_installed`, one line naming the extra).

    tensorboard   event files in RUN/logs/tensorboard/<run name>/
    mlflow        MLFLOW_TRACKING_URI when set, else a local file store in RUN/logs/mlruns (experiment "ftkit")
    wandb         project "ftkit", run <run name>, files in RUN/logs/wandb; WANDB_MODE=offline keeps it local

The scalars are metrics.jsonl's, under the same names (loss, lr, grad_norm, tokens_per_s, val_loss, ...),
at the optimizer step; the resolved recipe is stored as the run's configuration (dotted keys).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

from ftkit.errors import ArgumentError
from ftkit.rundir import LOGS

#: tracker → (the module it needs, the ftkit extra that installs it)
REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
PROJECT = "ftkit"


def check_installed(names: list[str]) -> None:
    """ArgumentError (exit 2) naming the extra of the first tracker whose package is missing."""
    for name in names:
        module, extra = REQUIRES[name]
        if importlib.util.find_spec(module) is None:
            raise ArgumentError(
                f"train.report_to: {name} is not installed; pip install 'ftkit[{extra}]' (or remove it from report_to)"
            )


class Trackers:
    """The run's trackers (main process only): started with the recipe as configuration, fed each record."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any]):
        logs, run_name = (run_dir / LOGS).resolve(), run_dir.resolve().name
        self._trackers = [_start(name, logs, run_name) for name in names]
        flat = _flatten(config)
        for tracker in self._trackers:
            tracker.store_init_configuration(flat)

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k not in ("step", "skipped") and _is_number(v)}
        for tracker in self._trackers:
            tracker.log(values, step=record["step"])

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []


def _start(name: str, logs: Path, run_name: str) -> Any:
    logs.mkdir(parents=True, exist_ok=True)
    if name == "tensorboard":
        tracker = TensorBoardTracker(run_name, logs / "tensorboard")
    elif name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow  # optional (the mlflow extra): only a recipe that reports to MLflow imports it

            # MLflow 3 refuses a file store unless told it is wanted: a run's own store is exactly that
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((logs / "mlruns").as_uri())
        tracker = MLflowTracker(experiment_name=PROJECT, run_name=run_name)
    else:
        tracker = WandBTracker(PROJECT, name=run_name, dir=str(logs))
    tracker.start()
    return tracker


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{train: {lr: 1e-4}}` → `{"train.lr": 1e-4}`; lists, None and other values as text (what trackers take)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, bool | int | float | str):
            flat[f"{prefix}{key}"] = value
        else:  # None too: TensorBoard's hparams refuse it
            flat[f"{prefix}{key}"] = str(value)
    return flat
