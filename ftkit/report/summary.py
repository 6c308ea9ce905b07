"""metrics.jsonl → the figures of summary.json (facts, first/last/best losses, diagnosis, task section)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftkit.errors import RunDirError
from ftkit.report.diagnosis import diagnose
from ftkit.tasks import task_of_run

# Final losses are averaged over this many logged steps, to damp batch-to-batch noise.
FINAL_LOSS_WINDOW = 5


def read_metrics(path: Path) -> list[dict]:
    """Read metrics.jsonl: one JSON object per line, in order.

    Blank lines are skipped. An unparseable *last* line is skipped too: it is a line
    torn by a crash or kill mid-write, and the rest of the run is still worth reporting.
    An unparseable line anywhere else means the file is damaged: raises RunDirError
    (an FtkitError) naming `path:line`. NaN/Infinity are accepted, as json writes them.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RunDirError(f"{path}: cannot read metrics ({err.strerror})") from err
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records: list[dict] = []
    for i, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(numbered) - 1:
                break
            raise RunDirError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete this line") from err
        if not isinstance(record, dict):
            raise RunDirError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def split_curves(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) as (step, loss) pairs; an eval record is one that has "val_loss"."""
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    for r in records:
        if "val_loss" in r:
            val.append((int(r["step"]), _as_float(r["val_loss"])))
        elif "loss" in r:
            train.append((int(r["step"]), _as_float(r["loss"])))
    return train, val


def _as_float(value: Any) -> float:
    """A logged loss as float; null (a loss that could not be serialised) reads as NaN."""
    return float("nan") if value is None else float(value)


def summarize(records: list[dict], facts: dict) -> dict:
    """The summary.json content: facts, figures derived from the metrics, and the diagnosis."""
    train, val = split_curves(records)
    last_train = [v for _, v in train[-FINAL_LOSS_WINDOW:]]
    finite_val = [(s, v) for s, v in val if math.isfinite(v)]
    best = min(finite_val, key=lambda p: p[1]) if finite_val else None
    diagnosis = diagnose(train, val)
    summary = {
        "facts": facts,
        "first_loss": train[0][1] if train else None,
        "final_loss": sum(last_train) / len(last_train) if last_train else None,
        "first_val_loss": val[0][1] if val else None,
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": best[1] if best else None,
        "best_step": best[0] if best else None,
        "last_step": max((s for s, _ in train + val), default=None),
        "n_logged_steps": len(train),
        "n_evals": len(val),
        "diagnosis": asdict(diagnosis),
    }
    task = task_of_run(facts)
    section = task.summarize(records, facts)
    if section is not None:
        summary[task.summary_key] = section
    return summary


def json_safe(value: Any) -> Any:
    """A copy with NaN/±inf floats as None, so the JSON is valid for every reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_facts(summary_path: Path) -> dict:
    """The "facts" of an earlier summary.json, or {} when there is none yet."""
    if not summary_path.is_file():
        return {}
    try:
        return json.loads(summary_path.read_text(encoding="utf-8")).get("facts") or {}
    except (json.JSONDecodeError, AttributeError) as err:
        raise RunDirError(f"{summary_path}: not a valid summary ({err}); pass the facts or delete it") from err
