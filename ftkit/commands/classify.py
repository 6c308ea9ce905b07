"""A classifier's run after training: `ftkit eval`, `ftkit generate` (label prediction), report.md.

    run_classification_eval(target, ...)   loss, accuracy, per-label counts, confusion matrix
    run_predict(target, prompt, ...)       `ftkit generate` on a classifier: a label per text
    summarize_classification(records, facts) / classification_section(summary)
                                           summary.json's and report.md's accuracy figures

Metrics, over the examples the training pipeline builds (`ftkit.data.load_splits`), so `loss`
and `accuracy` on a run's own validation set equal its last `val_loss` / `val_accuracy`:

    loss        Σ_i −log p(y_i | text_i) / n                (ftkit.tasks.classification.Classification)
    accuracy    share of examples whose argmax class is the label
    per_label   for each class: examples, correct, recall (= correct / examples), predicted
                (how often it was predicted) and precision (= correct / predicted)
    confusion   matrix[true][predicted] = count, rows and columns in label-id order
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from ftkit.errors import ArgumentError, DataError, ModelError
from ftkit.io import data as data_stream


def _labels(target: Any) -> list[str]:
    labels = target.labels
    if labels is None:
        raise ModelError(f"{target.spec}: a classifier whose labels are unknown; give its run directory")
    return labels


def load_examples(target: Any, tokenizer: Any, data: str | None, max_samples: int | None) -> tuple[list, str, str]:
    """(examples, what the data was in words, short stem): the run's val set, or `data`'s rows."""
    from ftkit.data.classification import encode_rows
    from ftkit.data.splits import read_key_rows

    labels = _labels(target)
    recipe = target.recipe
    max_length = recipe.data.max_length if recipe is not None else 1024
    if data is not None:
        rows = read_key_rows("--data", data)[:max_samples]
        examples, _ = encode_rows(rows, labels, tokenizer, max_length, "the run's data.train")
        return examples, data, Path(data).stem
    if recipe is None:
        raise ArgumentError(f"{target.spec} is not a run, so it has no validation set; pass --data FILE")
    from ftkit.data import load_splits

    examples = load_splits(recipe.data, tokenizer, recipe.train.seed).val[:max_samples]
    if not examples:
        raise DataError(f"{target.run_dir}: the run has no validation set (data.val / val_fraction); pass --data")
    kind = f"data.val {recipe.data.val}" if recipe.data.val else f"data.val_fraction of {recipe.data.train}"
    stem = Path(recipe.data.val).stem if recipe.data.val else "heldout"
    return examples, f"the run's validation set ({kind})", stem


def predict(model: Any, examples: list, pad_id: int, batch_size: int) -> list[list[float]]:
    """Class log-probabilities of each example (log-softmax of the head's logits), in input order."""
    import torch

    from ftkit.tasks.classification import class_logits, collate_left

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)  # little padding per batch
    probs: list[list[float]] = [[] for _ in examples]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_left([examples[i] for i in rows], pad_id).items()}
            for i, p in zip(rows, class_logits(model, batch).float().log_softmax(-1).tolist(), strict=True):
                probs[i] = p
    return probs


def confusion(examples: list, predicted: list[int], labels: list[str]) -> tuple[list[list[int]], dict[str, dict]]:
    """(matrix[true][predicted], per-label figures); see the module docstring."""
    n = len(labels)
    matrix = [[0] * n for _ in range(n)]
    for example, guess in zip(examples, predicted, strict=True):
        matrix[example.label][guess] += 1
    per_label = {}
    for i, name in enumerate(labels):
        support, correct, chosen = sum(matrix[i]), matrix[i][i], sum(row[i] for row in matrix)
        per_label[name] = {
            "examples": support,
            "correct": correct,
            "recall": correct / support if support else None,
            "predicted": chosen,
            "precision": correct / chosen if chosen else None,
        }
    return matrix, per_label


def run_classification_eval(
    target: Any,
    data: str | None = None,
    baseline: bool = False,
    max_samples: int | None = None,
    batch_size: int | None = None,
    save: bool = True,
) -> dict:
    """`ftkit eval` of a classifier: the result dict (written to the run dir for a run)."""
    import torch

    from ftkit.commands.eval import _refresh_report, write_eval_file
    from ftkit.models.target import device_type, load_model, load_tokenizer

    if baseline:
        raise ArgumentError(
            "--baseline: a classifier's base has no trained head (its classes start at random), "
            "so there is nothing to compare with; drop --baseline"
        )
    started = time.perf_counter()
    labels = _labels(target)
    tokenizer = load_tokenizer(target)
    examples, label, stem = load_examples(target, tokenizer, data, max_samples)
    batch_size = batch_size or (target.recipe.train.batch_size if target.recipe else 8)
    model = load_model(target, tokenizer)
    logps = predict(model, examples, tokenizer.pad_token_id, batch_size)  # one pass gives loss, accuracy, confusion
    predicted = [max(range(len(p)), key=p.__getitem__) for p in logps]
    n = max(len(examples), 1)
    loss = -sum(p[ex.label] for ex, p in zip(examples, logps, strict=True)) / n  # Classification's loss
    accuracy = sum(guess == ex.label for ex, guess in zip(examples, predicted, strict=True)) / n
    matrix, per_label = confusion(examples, predicted, labels)
    counts = [sum(row) for row in matrix]
    result: dict[str, Any] = {
        "target": target.spec,
        "weights": target.weights,
        "checkpoint": target.checkpoint,
        "task": "classification",
        "data": label,
        "format": "classification",
        "n_examples": len(examples),
        "labels": labels,
        "tuned": {"loss": loss, "accuracy": accuracy},
        "majority_baseline": max(counts) / max(len(examples), 1),  # accuracy of always guessing the commonest class
        "per_label": per_label,
        "confusion": {"rows": "true label", "columns": "predicted label", "labels": labels, "matrix": matrix},
        "batch_size": batch_size,
        "device": device_type() + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "wall_s": time.perf_counter() - started,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "predictions": [
            {
                "source": ex.source,
                "label": labels[ex.label],
                "predicted": labels[guess],
                "probability": math.exp(p[guess]),
            }
            for ex, guess, p in zip(examples, predicted, logps, strict=True)
        ],
    }
    if save and target.run_dir is not None:
        result["file"] = str(write_eval_file(target.run_dir, result, stem, target.checkpoint))
        _refresh_report(target.run_dir)
    return result


def confusion_table(result: dict) -> str:
    """The confusion matrix as text lines (rows: true label, columns: predicted)."""
    labels, matrix = result["confusion"]["labels"], result["confusion"]["matrix"]
    width = max(len(name) for name in [*labels, "true \\ predicted"])
    cells = max(max(len(name) for name in labels), *(len(str(c)) for row in matrix for c in row))
    lines = ["true \\ predicted".ljust(width) + "  " + "  ".join(name.rjust(cells) for name in labels)]
    for name, row in zip(labels, matrix, strict=True):
        lines.append(name.ljust(width) + "  " + "  ".join(str(c).rjust(cells) for c in row))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- ftkit generate on a classifier


def run_predict(
    target: Any, prompt: str | None, batch_size: int = 8, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> list[str]:
    """`ftkit generate` on a classifier: it writes no text, it predicts a label per input.

    --prompt TEXT → the label on stdout; stdin lines → one label per line; JSONL rows with
    `text` → the rows with `predicted` and `probabilities` ({label: p}) added. Returns the labels.
    """
    from ftkit.commands.generate import command_inputs
    from ftkit.data.classification import ClassExample, encode_text, text_of
    from ftkit.models.target import load_model, load_tokenizer

    stdout = stdout or data_stream()
    items, is_jsonl = command_inputs(
        prompt, stdin, "no texts: give --prompt TEXT or pipe texts on stdin (one per line, or JSONL with text)"
    )
    labels = _labels(target)
    print(f"note: {target.spec} is a classifier ({', '.join(labels)}): predicting a label per text", file=sys.stderr)
    tokenizer = load_tokenizer(target)
    max_length = target.recipe.data.max_length if target.recipe is not None else 1024
    texts = [text_of(item, f"stdin:{i + 1}") if is_jsonl else item for i, item in enumerate(items)]
    examples = [ClassExample(encode_text(t, tokenizer, max_length)[0], 0, "input") for t in texts]
    model = load_model(target, tokenizer)
    probs = [[math.exp(x) for x in p] for p in predict(model, examples, tokenizer.pad_token_id, batch_size)]
    predicted = [labels[max(range(len(p)), key=p.__getitem__)] for p in probs]
    for item, name, p in zip(items, predicted, probs, strict=True):
        if is_jsonl:
            row = {**item, "predicted": name, "probabilities": dict(zip(labels, p, strict=True))}
            stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            stdout.write(name + "\n")
    stdout.flush()
    return predicted
