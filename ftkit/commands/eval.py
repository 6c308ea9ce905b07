"""`ftkit eval`: measure a run, an adapter or a model on a dataset, optionally against its base.

    eval_format → load_tokenizer → load_eval_set → measuring_task(...).evaluate → result → file, report

The examples are the ones the training pipeline builds (same format, masks, max_length;
`ftkit.data.load_splits`), so `loss` on a run's own validation set equals the last
`val_loss` in its metrics.jsonl. What is measured is the task's (ftkit.tasks), chosen by the
model and the data format:

    causal_lm       loss, perplexity, token_accuracy; exact_match and normalized_match of greedy
                    generations (ftkit.tasks.causal_lm)
    preference      on chosen/rejected pairs (a DPO/IPO/ORPO/SimPO run, or `--format preference`):
                    the objective's loss, rewards/*, logps/*; no generation (ftkit.tasks.preference)
    classification  loss, accuracy, per-label figures and the confusion matrix (ftkit.tasks.classification)

`--baseline` measures the base the same way. Results go to stdout as JSON with `--json`,
else as a table on stderr, and for a run to `eval-<data>-<time>.json` in the run directory
(never overwritten).
"""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ftkit.commands import medusa
from ftkit.data import load_splits, read_rows
from ftkit.data.splits import load_file
from ftkit.errors import ArgumentError, DataError, FtkitError
from ftkit.io import data as data_stream
from ftkit.io import messages
from ftkit.methods.medusa_decode import is_medusa_target
from ftkit.models.target import Target, device_type, load_tokenizer
from ftkit.recipe.schema import DataSection
from ftkit.report import refresh_report
from ftkit.tasks import measuring_task, task_of
from ftkit.tasks.evaluation import EvalOptions, EvalSet


def eval_format(target: Target, fmt: str | None) -> str:
    """The data format eval rows are read in: `fmt` (--format), else the run's, else the default of the
    target's task (alpaca for a causal LM); ArgumentError when no task measures this model on it."""
    fmt = fmt or target.data_format or task_of(target).data_formats[0]
    measuring_task(target, fmt)
    return fmt


def load_eval_set(
    target: Target, tokenizer: Any, data: str | None, fmt: str | None, max_samples: int | None
) -> EvalSet:
    """The run's validation examples, or every row of `data`; first `max_samples` only when given.
    Rows are read in `eval_format(target, fmt)`; a classifier's class ids are those it was trained on."""
    recipe = target.recipe
    fmt = eval_format(target, fmt)
    if data is not None:
        section = DataSection(
            train=data,
            format=fmt,
            max_length=recipe.data.max_length if recipe else 1024,
            train_on_prompt=recipe.data.train_on_prompt if recipe else False,
            max_samples=max_samples,
        )
        labels = target.known_labels() if target.is_classifier else None
        examples = load_file("--data", data, section, tokenizer, labels)
        label, stem, source_file = data, Path(data).stem, data
    else:
        if recipe is None:
            raise ArgumentError(f"{target.spec} is not a run, so it has no validation set; pass --data FILE")
        if recipe.data.format != fmt:
            recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"format": fmt})})
        examples = load_splits(recipe.data, tokenizer, recipe.train.seed).val[:max_samples]
        if not examples:
            raise DataError(f"{target.run_dir}: the run has no validation set (data.val / val_fraction); pass --data")
        source_file = recipe.data.val or recipe.data.train
        kind = f"data.val {recipe.data.val}" if recipe.data.val else f"data.val_fraction of {recipe.data.train}"
        label = f"the run's validation set ({kind})"
        stem = Path(recipe.data.val).stem if recipe.data.val else "heldout"
    by_source = {source: row for row, source in read_rows(source_file)}
    return EvalSet(examples, [by_source[ex.source] for ex in examples], fmt, label, stem, own_val=data is None)


def run_eval(
    target: Target,
    data: str | None = None,
    fmt: str | None = None,
    baseline: bool = False,
    max_samples: int | None = None,
    batch_size: int | None = None,
    generation: bool = True,
    max_new_tokens: int | None = None,
    save: bool = True,
) -> dict:
    """Evaluate `target` (and its base with `baseline`); return the result and write it for a run.
    The result's layout is in ftkit.tasks.evaluation."""
    started = time.perf_counter()
    fmt = eval_format(target, fmt)
    tokenizer = load_tokenizer(target)
    evalset = load_eval_set(target, tokenizer, data, fmt, max_samples)
    options = EvalOptions(
        batch_size=batch_size or (target.recipe.train.batch_size if target.recipe else 8),
        baseline=baseline,
        generation=generation,
        max_new_tokens=max_new_tokens,
    )
    if is_medusa_target(target):  # the heads' accuracy and speed-up besides the usual figures
        evaluation = medusa.evaluate(target, tokenizer, evalset, options)
    else:
        evaluation = measuring_task(target, evalset.fmt).evaluate(target, tokenizer, evalset, options)
    result: dict[str, Any] = {"target": target.spec, "weights": target.weights, "checkpoint": target.checkpoint}
    result |= evaluation.fields
    result |= {
        "batch_size": options.batch_size,
        "device": device_type() + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "wall_s": time.perf_counter() - started,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        evaluation.records_key: evaluation.records,
    }
    if save and target.run_dir is not None:
        result["file"] = str(write_eval_file(target.run_dir, result, evalset.stem, target.checkpoint))
        refresh_report(target.run_dir)
    return result


def write_eval_file(run_dir: Path, result: dict, stem: str, checkpoint: str | None) -> Path:
    """`eval-<data>[-<checkpoint>]-<UTC time>.json` in the run dir, created exclusively: never overwrites."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = "-".join(
        part for part in ("eval", stem, None if checkpoint in (None, "final") else checkpoint, stamp) if part
    )
    for attempt in range(1, 1000):
        path = run_dir / (f"{name}.json" if attempt == 1 else f"{name}-{attempt}.json")
        try:
            with path.open("x", encoding="utf-8") as out:
                out.write(json.dumps(result | {"file": str(path)}, indent=2, allow_nan=True) + "\n")
            return path
        except FileExistsError:
            continue
    raise FtkitError(f"{run_dir}: cannot find a free name for {name}.json")


# ---------------------------------------------------------------- the table for people

_ROWS = (
    ("loss", "{:.4f}"),
    ("perplexity", "{:.2f}"),
    ("token_accuracy", "{:.1%}"),
    ("accuracy", "{:.1%}"),
    ("exact_match", "{:.1%}"),
    ("normalized_match", "{:.1%}"),
    ("rewards/accuracy", "{:.1%}"),
    ("rewards/margin", "{:.3f}"),
    ("rewards/chosen", "{:.3f}"),
    ("rewards/rejected", "{:.3f}"),
    ("logps/accuracy", "{:.1%}"),
    ("logps/chosen", "{:.2f}"),
    ("logps/rejected", "{:.2f}"),
    ("nll/chosen", "{:.4f}"),
)


def metrics_table(result: dict) -> Table:
    """One row per metric measured: its value, or base, tuned and delta (percentage points for shares)."""
    has_base = "base" in result
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header in ["metric", "base", "tuned", "delta"] if has_base else ["metric", "value"]:
        table.add_column(header)
    for key, spec in _ROWS:
        if key not in result["tuned"]:
            continue
        tuned = spec.format(result["tuned"][key])
        if has_base:
            delta = result["delta"][key]
            delta_text = f"{delta * 100:+.1f} pt" if "%" in spec else f"{delta:+.4f}"
            table.add_row(key, spec.format(result["base"][key]), tuned, delta_text)
        else:
            table.add_row(key, tuned)
    return table


def confusion_table(confusion: dict) -> Table:
    """A confusion matrix (rows: true label, columns: predicted), as a result's `confusion` records it."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("true \\ predicted")
    for name in confusion["labels"]:
        table.add_column(name, justify="right")
    for name, row in zip(confusion["labels"], confusion["matrix"], strict=True):
        table.add_row(name, *(str(count) for count in row))
    return table


def medusa_table(figures: dict) -> Table:
    """A medusa run's heads: top-1 accuracy per head, tokens per forward, speed-ups, identical outputs."""
    table = Table("medusa", "value", box=None, pad_edge=False, header_style="bold")
    for key, value in figures.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.3f}")
        elif isinstance(value, int):
            table.add_row(key, str(value))
    return table


def format_table(result: dict) -> str:
    """The human summary printed on stderr: what was measured, the metrics table (a classifier's
    confusion matrix under it), and where the result went."""
    head = (
        f"{result['target']} ({result['checkpoint'] or 'model'}) on {result['data']}: {result['n_examples']} examples"
    )
    foot = f"{result['wall_s']:.1f}s on {result['device']}" + (f" · wrote {result['file']}" if "file" in result else "")
    tables = [metrics_table(result)] + ([confusion_table(result["confusion"])] if "confusion" in result else [])
    if "medusa" in result:
        tables.append(medusa_table(result["medusa"]))
    buffer = io.StringIO()
    # plain text: no colour codes in a log, and labels such as "[neg]" are names, not rich markup
    console = Console(file=buffer, width=200, color_system=None, markup=False, emoji=False, highlight=False)
    for table in tables:
        console.print(table)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]  # rich pads the last column
    return "\n".join([head, *lines, foot]) + "\n"


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        data_stream().write(json.dumps(result, indent=2, allow_nan=True) + "\n")
    else:
        messages().write(format_table(result))
