"""task: classification: recipe rules, the classification data format and its label mapping, left
padding that keeps a classifier's logits independent of its batch, the freeze head, and the generator
of the committed example data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftkit.data import load_splits
from ftkit.data.classification import encode_text, label_names
from ftkit.errors import DataError, RecipeError
from ftkit.models.builtin import build_byte_tokenizer
from ftkit.recipe import parse_recipe
from ftkit.recipe.schema import DataSection
from tests.support.helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = "task: classification\nmethod: {name: lora}\ndata: {train: t.jsonl}\n"


def problems_of(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "recipe.yaml")
    return info.value.problems


# --- recipe rules ------------------------------------------------------------------------------


def test_classification_recipe_defaults_its_format_and_notes_it():
    recipe = parse_recipe(CLASSIFIER)
    assert recipe.task == "classification" and recipe.data.format == "classification"
    assert any(note.startswith("data.format: classification") for note in recipe.notes)
    assert parse_recipe("method: {name: lora}\ndata: {train: t.jsonl}\n").task == "causal_lm"


@pytest.mark.parametrize(
    ("extra", "key", "line"),
    [
        ("objective: {name: dpo}\n", "objective.name: dpo", 4),
        ("perf: {kernels: liger}\n", "perf.kernels: liger", 4),
    ],
)
def test_classifier_refuses_what_it_cannot_do(extra, key, line):
    (problem,) = problems_of(CLASSIFIER + extra)
    assert problem.startswith(f"recipe.yaml:{line}: {key}") and "classification" in problem


def test_classifier_refuses_packing_and_train_on_prompt_at_once():
    problems = problems_of(
        "task: classification\nmethod: {name: lora}\ndata: {train: t.jsonl, packing: true, train_on_prompt: true}\n"
    )
    assert [p.split(": ", 2)[1] for p in problems] == ["data.packing", "data.train_on_prompt"]
    assert all(p.startswith("recipe.yaml:3:") for p in problems)


def test_format_and_task_must_agree():
    (wrong_format,) = problems_of(
        "task: classification\nmethod: {name: lora}\ndata: {train: t.jsonl, format: alpaca}\n"
    )
    assert "data.format: alpaca" in wrong_format and "task: classification" in wrong_format
    (no_task,) = problems_of("method: {name: lora}\ndata: {train: t.jsonl, format: classification}\n")
    assert "set task: classification" in no_task
    (labels_without_task,) = problems_of("method: {name: lora}\ndata: {train: t.jsonl, labels: [a, b]}\n")
    assert labels_without_task.startswith("recipe.yaml:2: data.labels")


def test_repeated_label_in_the_recipe_is_an_error():
    (problem,) = problems_of(CLASSIFIER.replace("t.jsonl}", "t.jsonl, labels: [pos, neg, pos]}"))
    assert "data.labels" in problem and "'pos' listed twice" in problem
    (problem,) = problems_of(CLASSIFIER.replace("t.jsonl}", "t.jsonl, labels: [pos]}"))
    assert problem.startswith("recipe.yaml:3: data.labels: list at least two class names")


# --- data format and label mapping ----------------------------------------------------------------


def rows_at(path: Path, rows: list[dict]) -> list[tuple[dict, str]]:
    write_jsonl(path, rows)
    return [(row, f"{path}:{i}") for i, row in enumerate(rows, start=1)]


def test_labels_sorted_by_default_numerically_when_integers(tmp_path):
    assert label_names(rows_at(tmp_path / "a.jsonl", [{"label": "b"}, {"label": "a"}, {"label": "b"}]), None) == [
        "a",
        "b",
    ]
    numbers = rows_at(tmp_path / "n.jsonl", [{"label": 10}, {"label": 2}, {"label": 1}])
    assert label_names(numbers, None) == ["1", "2", "10"]


def test_listed_labels_keep_their_order_and_must_match_the_data(tmp_path):
    rows = rows_at(tmp_path / "t.jsonl", [{"label": "pos"}, {"label": "neg"}])
    assert label_names(rows, ["pos", "neg"]) == ["pos", "neg"]
    with pytest.raises(DataError, match=r"data\.labels: 'neutral' has no row in data\.train"):
        label_names(rows, ["pos", "neg", "neutral"])
    with pytest.raises(DataError, match=rf"{tmp_path}/t\.jsonl:2: label 'neg' is not in data\.labels"):
        label_names(rows, ["pos", "other"])


def test_one_class_is_not_a_classifier(tmp_path):
    with pytest.raises(DataError, match="at least two classes"):
        label_names(rows_at(tmp_path / "t.jsonl", [{"label": "a"}, {"label": "a"}]), None)


def splits_of(tmp_path: Path, train: list[dict], val: list[dict] | None = None, **data):
    write_jsonl(tmp_path / "train.jsonl", train)
    if val is not None:
        write_jsonl(tmp_path / "val.jsonl", val)
        data["val"] = str(tmp_path / "val.jsonl")
    section = DataSection(train=str(tmp_path / "train.jsonl"), format="classification", **data)
    return load_splits(section, build_byte_tokenizer(), seed=0)


GOOD = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]


def test_splits_map_labels_and_count_them(tmp_path):
    splits = splits_of(tmp_path, GOOD * 2, [{"text": "fine", "label": "pos"}])
    assert splits.labels == ["neg", "pos"]
    assert [ex.label for ex in splits.train] == [1, 0, 1, 0]
    assert splits.stats["train_label_counts"] == {"neg": 2, "pos": 2}
    assert splits.stats["val_label_counts"] == {"neg": 0, "pos": 1}
    assert splits.val[0].source == f"{tmp_path}/val.jsonl:1"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"label": "pos"}, "missing field 'text'"),
        ({"text": "x"}, "missing field 'label'"),
        ({"text": "x", "label": 1.5}, "field 'label' must be a string or an integer"),
        ({"text": ["x"], "label": "pos"}, "field 'text' must be a string"),
    ],
)
def test_bad_rows_name_their_file_and_line(tmp_path, row, message):
    with pytest.raises(DataError) as info:
        splits_of(tmp_path, [*GOOD, row])
    assert str(info.value).startswith(f"{tmp_path}/train.jsonl:3: {message}")
    assert "\n" not in str(info.value)


def test_val_label_unseen_in_train_is_an_error_naming_the_val_row(tmp_path):
    with pytest.raises(DataError) as info:
        splits_of(tmp_path, GOOD, [{"text": "meh", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    message = str(info.value)
    assert message.startswith(f"{tmp_path}/val.jsonl:2: label 'neutral' never occurs in data.train")


def test_text_is_bos_text_eos_and_truncation_keeps_eos_last():
    tokenizer = build_byte_tokenizer()
    ids, truncated = encode_text("hello", tokenizer, 64)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and not truncated
    assert tokenizer.decode(ids[1:-1]) == "hello"
    ids, truncated = encode_text("x" * 100, tokenizer, 16)
    assert len(ids) == 16 and ids[-1] == tokenizer.eos_token_id and truncated


# --- the model side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    from ftkit.models.load import build_model
    from ftkit.recipe.schema import ModelSection

    model, tokenizer, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", 0, labels=["a", "b", "c"])
    return model.eval(), tokenizer


def test_classifier_is_built_with_its_labels(classifier):
    model, _ = classifier
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.num_labels == 3
    assert model.config.pad_token_id is not None  # the head finds each row's last token by it


def test_logits_do_not_depend_on_the_batch(classifier):
    """Left padding with position ids from 0 at each text's first token: a short text's logits in a
    batch with a long one equal its logits alone (fp32 rounding only, 1e-5)."""
    from ftkit.data.classification import ClassExample
    from ftkit.tasks.classification import class_logits, collate_left

    model, tokenizer = classifier
    short = ClassExample(encode_text("ok", tokenizer, 64)[0], 0, "s")
    long = ClassExample(encode_text("a much longer text than the other", tokenizer, 64)[0], 1, "l")
    batch = collate_left([short, long], tokenizer.pad_token_id)
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id and batch["position_ids"][0, -1] == short.length - 1
    assert batch["labels"].tolist() == [0, 1]
    with torch.no_grad():
        together = class_logits(model, batch)
        alone = class_logits(model, collate_left([short], tokenizer.pad_token_id))
    assert (together[0] - alone[0]).abs().max() <= 1e-5


def test_freeze_trains_the_new_head(classifier):
    from ftkit.methods import get_method
    from ftkit.recipe.methods import FreezeConfig

    model, _ = classifier
    get_method("freeze").apply(model, FreezeConfig(trainable_layers=0, trainable_modules=["norm"]), None)
    assert model.score.weight.requires_grad
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad


def test_objective_sums_cross_entropy_and_counts_correct(classifier):
    from ftkit.data.classification import ClassExample
    from ftkit.tasks.classification import Classification, class_logits

    model, tokenizer = classifier
    examples = [ClassExample(encode_text(t, tokenizer, 64)[0], y, t) for t, y in (("x", 0), ("yy", 2), ("z", 1))]
    objective = Classification()
    batch = objective.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        loss, metrics = objective.loss_sum(model, batch)
        logits = class_logits(model, batch)
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
    assert objective.units(batch) == 3 and float(loss) == pytest.approx(float(expected), abs=1e-6)
    assert int(metrics["accuracy"]) == int((logits.argmax(-1) == batch["labels"]).sum())


# --- report and data generator --------------------------------------------------------------------


def test_summary_and_report_of_a_classifier():
    from ftkit.report import render_markdown, summarize

    records = [{"step": s, "loss": 1.0 / s, "accuracy": 0.5 + s / 40} for s in range(1, 11)]
    records += [{"step": 5, "val_loss": 0.6, "val_accuracy": 0.7}, {"step": 10, "val_loss": 0.5, "val_accuracy": 0.8}]
    facts = {"task": "classification", "labels": ["a", "b"], "val_label_counts": {"a": 3, "b": 1}}
    summary = summarize(records, facts)
    figures = summary["classification"]
    assert figures["final_val_accuracy"] == 0.8 and figures["best_accuracy_step"] == 10
    assert figures["majority_baseline"] == 0.75
    assert figures["final_train_accuracy"] == pytest.approx(sum(0.5 + s / 40 for s in range(6, 11)) / 5)
    report = render_markdown(summary, None)
    assert "## Classification" in report and "80.0%" in report and "75.0%" in report
    assert "classification" not in summarize(records[:10], {"task": "causal_lm"})


def test_generator_is_deterministic_balanced_and_matches_the_committed_data(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "make_classification_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    import random

    rows = gen.make_rows(90, random.Random(0))
    assert rows == gen.make_rows(90, random.Random(0))
    assert {label: sum(r["label"] == label for r in rows) for label in gen.LABELS} == dict.fromkeys(gen.LABELS, 30)
    for row in rows:
        text = row["text"].lower()
        has_pos, has_neg = any(w in text for w in gen.POSITIVE), any(w in text for w in gen.NEGATIVE)
        assert (has_pos, has_neg) == {"positive": (True, False), "negative": (False, True)}.get(
            row["label"], (False, False)
        ), row
        assert len(row["text"]) <= gen.MAX_CHARS
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_classification_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "classification" / name).read_bytes()
