"""The classification task (`task: classification`): a sequence classifier learns `data.labels`.

    Classification                  the objective: cross-entropy over the labels
    ClassificationTask.evaluate     `ftkit eval`: loss, accuracy, per-label counts, confusion matrix
    ClassificationTask.predict      `ftkit generate`: a label per text
    summarize_classification / classification_section   summary.json's and report.md's figures

For a batch of examples with class ids y_i and the head's logits z_i ∈ R^C at each
example's last token,

    loss = Σ_i −log softmax(z_i)[y_i]  /  (number of examples in the window)
    accuracy = Σ_i [argmax z_i = y_i]   /  (number of examples in the window)

so the loop's unit is the example (`units` = batch size), and grad accumulation weighs
every example the same however the window is cut. `ftkit eval` reports the same loss and
accuracy (so on a run's own validation set they equal its last val_loss / val_accuracy), and

    per_label   for each class: examples, correct, recall (= correct / examples), predicted
                (how often it was predicted) and precision (= correct / predicted)
    confusion   matrix[true][predicted] = count, rows and columns in label-id order

Padding is on the left, and position ids count real tokens only (0, 1, ... from each
example's first token), so an example's logits do not depend on the batch it is in: the
head reads the last position, which is every row's last real token (EOS), also for peft's
prompt methods, whose forward hands the model embeddings (no ids to find the padding in).
peft ignores position ids for prompt_tuning / p_tuning (it warns); there the padding sits
between the virtual tokens and the text and shifts their relative positions, so those
methods' logits depend slightly on how much padding a batch has (length grouping keeps
it small). Every other method gets the position ids and is exact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ftkit.data.classification import ClassExample, encode_text, text_of
from ftkit.errors import ArgumentError
from ftkit.io import messages
from ftkit.models.target import Target, load_model
from ftkit.recipe.schema import Recipe
from ftkit.rundir import LABELS
from ftkit.tasks.causal_lm import input_device
from ftkit.tasks.evaluation import EvalOptions, EvalSet, Evaluation
from ftkit.tasks.objective import evaluate
from ftkit.tasks.prediction import Inputs, PredictOptions, write_predictions


def collate_left(examples: Sequence[ClassExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids (B × T, left-padded) and labels (B,) as int64."""
    width = max(ex.length for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = ex.length
        input_ids[row, width - n :] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, width - n :] = 1
        position_ids[row, width - n :] = torch.arange(n)
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def is_prompt_learning(model: Any) -> bool:
    """True for a peft model whose active adapter is a prompt method (it rejects position ids)."""
    model = getattr(model, "module", model)  # a DDP wrapper holds the peft model as `.module`
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def class_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's logits, shape (batch, num_labels), for a `collate_left` batch."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not is_prompt_learning(model):
        inputs["position_ids"] = batch["position_ids"]
    return model(**inputs).logits


class Classification:
    """Cross-entropy of a sequence classifier's head over the labels (see the module docstring)."""

    name = "classification"
    reports_perplexity = False

    def collate(self, examples: Sequence[ClassExample], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_left(examples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = class_logits(model, batch).float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        correct = (logits.argmax(dim=-1) == batch["labels"]).sum()
        return loss, {"accuracy": correct}


def write_labels(run_dir: Path, splits: Any) -> dict:
    """Write RUN/labels.json (class names in id order, id2label, per-split counts); return the
    facts summary.json gets from it."""
    labels = list(splits.labels)
    record = {
        "labels": labels,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "train_label_counts": splits.stats["train_label_counts"],
        "val_label_counts": splits.stats["val_label_counts"],
    }
    (Path(run_dir) / LABELS).write_text(json.dumps(record, indent=2) + "\n")
    return {"task": "classification"} | record


# ---------------------------------------------------------------- eval and predict


def class_logps(model: Any, examples: Sequence[ClassExample], pad_id: int, batch_size: int) -> list[list[float]]:
    """Class log-probabilities of each example (log-softmax of the head's logits), in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)  # little padding per batch
    logps: list[list[float]] = [[] for _ in examples]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_left([examples[i] for i in rows], pad_id).items()}
            for i, p in zip(rows, class_logits(model, batch).float().log_softmax(-1).tolist(), strict=True):
                logps[i] = p
    return logps


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def confusion(
    examples: Sequence[ClassExample], predicted: Sequence[int], labels: list[str]
) -> tuple[list[list[int]], dict[str, dict]]:
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


def evaluate_classifier(model: Any, evalset: EvalSet, labels: list[str], pad_id: int, batch_size: int) -> Evaluation:
    """Loss, accuracy, per-label figures and confusion matrix of a classifier, from one pass over the examples."""
    examples = evalset.examples
    logps = class_logps(model, examples, pad_id, batch_size)
    predicted = [argmax(p) for p in logps]
    n = max(len(examples), 1)
    loss = -sum(p[ex.label] for ex, p in zip(examples, logps, strict=True)) / n  # Classification's loss
    accuracy = sum(guess == ex.label for ex, guess in zip(examples, predicted, strict=True)) / n
    matrix, per_label = confusion(examples, predicted, labels)
    counts = [sum(row) for row in matrix]
    fields = {
        "task": "classification",
        **evalset.described(),
        "labels": labels,
        "tuned": {"loss": loss, "accuracy": accuracy},
        "majority_baseline": max(counts) / n,  # accuracy of always guessing the commonest class
        "per_label": per_label,
        "confusion": {"rows": "true label", "columns": "predicted label", "labels": labels, "matrix": matrix},
    }
    records = [
        {"source": ex.source, "label": labels[ex.label], "predicted": labels[guess], "probability": math.exp(p[guess])}
        for ex, guess, p in zip(examples, predicted, logps, strict=True)
    ]
    return Evaluation(fields, "predictions", records)


# ---------------------------------------------------------------- summary.json and report.md


def summarize_classification(records: list[dict], facts: dict) -> dict | None:
    """Accuracy figures of a classification run (None for other runs): first/final/best val accuracy,
    the final train accuracy (mean of the last 5 logged steps) and the majority-class baseline of val."""
    if facts.get("task") != "classification":
        return None
    val = [(int(r["step"]), float(r["val_accuracy"])) for r in records if "val_accuracy" in r]
    train = [float(r["accuracy"]) for r in records if "accuracy" in r and "loss" in r]
    counts = facts.get("val_label_counts") or {}
    best = max(val, key=lambda p: p[1]) if val else None
    return {
        "labels": facts.get("labels"),
        "first_val_accuracy": val[0][1] if val else None,
        "final_val_accuracy": val[-1][1] if val else None,
        "best_val_accuracy": best[1] if best else None,
        "best_accuracy_step": best[0] if best else None,
        "final_train_accuracy": sum(train[-5:]) / len(train[-5:]) if train else None,
        "majority_baseline": max(counts.values()) / sum(counts.values()) if counts and sum(counts.values()) else None,
    }


def classification_section(summary: dict, facts: dict) -> str:
    """report.md's "Classification" section."""

    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    best_step = summary.get("best_accuracy_step")
    rows = [
        ("val accuracy, last eval", pct(summary.get("final_val_accuracy"))),
        ("val accuracy, best", pct(summary.get("best_val_accuracy")) + (f" at step {best_step}" if best_step else "")),
        ("val accuracy, first eval", pct(summary.get("first_val_accuracy"))),
        ("train accuracy, last 5 steps", pct(summary.get("final_train_accuracy"))),
        ("always the commonest class (val)", pct(summary.get("majority_baseline"))),
    ]
    train_counts, val_counts = facts.get("train_label_counts") or {}, facts.get("val_label_counts") or {}
    labels = summary.get("labels") or []
    lines = [
        "## Classification\n",
        "A sequence classifier: the head reads each text's last token and picks one of the labels; "
        "loss is the cross-entropy over the labels, accuracy the share of examples whose top label is right.\n",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "| label | train examples | val examples |",
        "|---|---|---|",
        *(f"| {name} | {train_counts.get(name, 0)} | {val_counts.get(name, 0)} |" for name in labels),
        "",
    ]
    return "\n".join(lines)


class ClassificationTask:
    """A sequence classifier learns `data.labels` (see the module docstring)."""

    name = "classification"
    generates_text = False  # its val accuracy is in metrics.jsonl and the report
    summary_key = "classification"
    model_kind = "classifier"
    data_formats = ("classification",)

    def objective(
        self, recipe: Recipe, model: Any, splits: Any, run_dir: Path, device: Any, pad_id: int
    ) -> tuple[Classification, dict]:
        return Classification(), write_labels(run_dir, splits)

    def scoring_objective(self, recipe: Recipe) -> Classification:
        return Classification()

    def summarize(self, records: list[dict], facts: dict) -> dict | None:
        return summarize_classification(records, facts)

    def report_section(self, summary: dict, facts: dict) -> str:
        return classification_section(summary, facts)

    def synthetic_examples(self, rows: list[list[int]]) -> list[ClassExample]:
        """Random token rows as examples of class 0 (merge verification without data)."""
        return [ClassExample(row, 0, f"synthetic:{i}") for i, row in enumerate(rows)]

    def score(self, model: Any, examples: Sequence[ClassExample], pad_id: int) -> tuple[torch.Tensor, float]:
        """(class logits of `examples` in one left-padded batch, float32 on the CPU, and their loss)."""
        device = input_device(model)
        batch = {k: v.to(device) for k, v in collate_left(examples, pad_id).items()}
        with torch.no_grad():
            logits = class_logits(model, batch)
        loss = evaluate(model, examples, len(examples), pad_id, device, Classification())["loss"]
        return logits.float().cpu(), loss

    def evaluate(self, target: Target, tokenizer: Any, evalset: EvalSet, options: EvalOptions) -> Evaluation:
        """`ftkit eval` of a classifier: loss, accuracy, per-label figures, confusion matrix, a prediction per row."""
        if options.baseline:
            raise ArgumentError(
                "--baseline: a classifier's base has no trained head (its classes start at random), "
                "so there is nothing to compare with; drop --baseline"
            )
        labels = target.known_labels()
        model = load_model(target, tokenizer)
        return evaluate_classifier(model, evalset, labels, tokenizer.pad_token_id, options.batch_size)

    def predict(
        self, target: Target, tokenizer: Any, inputs: Inputs, options: PredictOptions, out: TextIO
    ) -> list[str]:
        """`ftkit generate` on a classifier: it writes no text, it predicts a label per input.

        --prompt TEXT → the label; plain lines → one label per line; JSONL rows with `text` →
        the rows with `predicted` and `probabilities` ({label: p}) added. Returns the labels.
        """
        labels = target.known_labels()
        print(
            f"note: {target.spec} is a classifier ({', '.join(labels)}): predicting a label per text", file=messages()
        )
        max_length = target.recipe.data.max_length if target.recipe is not None else 1024
        texts = [text_of(item, inputs.source(i)) if inputs.is_jsonl else item for i, item in enumerate(inputs.items)]
        examples = [ClassExample(encode_text(text, tokenizer, max_length)[0], 0, "input") for text in texts]
        model = load_model(target, tokenizer)
        logps = class_logps(model, examples, tokenizer.pad_token_id, options.batch_size)
        probs = [[math.exp(x) for x in p] for p in logps]
        predicted = [labels[argmax(p)] for p in probs]
        fields = [
            {"predicted": name, "probabilities": dict(zip(labels, p, strict=True))}
            for name, p in zip(predicted, probs, strict=True)
        ]
        write_predictions(out, inputs, predicted, fields)
        return predicted
