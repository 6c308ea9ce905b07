"""Every family as a classifier (task: classification), through `ftkit train` as a user runs it:
loss falls, ftkit's trainable count is peft's, final/ loads back with the real transformers / peft
classes and reproduces training, and merging equals the adapter. Then what a user does next with a
classification run: eval (accuracy, confusion matrix), generate (label prediction), merge, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ftkit.recipe import load_recipe
from ftkit.tasks.classification import Classification, class_logits, collate_left
from ftkit.tasks.objective import evaluate
from tests.support.classification_data import write_class_data
from tests.support.helpers import make_recipe, read_metrics, run_cli
from tests.support.methods_table import CLASSIFICATION_CASES, Run, row_trainer

RUN_FILES = {"recipe.yaml", "metrics.jsonl", "final", "summary.json", "loss.png", "report.md", "labels.json"}


@pytest.fixture(scope="session")
def class_data(tmp_path_factory) -> Path:
    return write_class_data(tmp_path_factory.mktemp("class-data"))


@pytest.fixture(scope="module")
def class_runs(request, tmp_path_factory, class_data):
    """`class_runs(name)`: the classification table row trained once through the CLI (cached)."""
    return row_trainer(
        request, tmp_path_factory, CLASSIFICATION_CASES, lambda pretrained: class_data, task="classification"
    )


@pytest.fixture(scope="module", params=sorted(CLASSIFICATION_CASES))
def trained(request, class_runs) -> Run:
    return class_runs(request.param)


def load_final(run: Run):
    """final/ through the real classes, as a user without ftkit loads it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    final = run.run_dir / "final"
    if (final / "adapter_config.json").is_file():
        labels = run.labels  # a user's base (not built-in) does not record them: pass them in
        base = AutoModelForSequenceClassification.from_pretrained(
            run.adapter_base, num_labels=len(labels), dtype=torch.float32
        )
        return PeftModel.from_pretrained(base, final)
    return AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32)


def test_cli_succeeds_with_clean_stdout(trained):
    code, out, err = trained.result
    assert code == 0, err
    assert out == ""  # even with deepspeed installed (its import-time log goes to stderr: ftkit.io)
    assert {p.name for p in trained.run_dir.iterdir()} >= RUN_FILES
    assert not (trained.run_dir / "samples.jsonl").exists()  # a classifier generates no text


def test_loss_falls_and_accuracy_is_logged(trained):
    train, val = read_metrics(trained.run_dir)
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.9 * first, (first, last)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in train)
    assert val and 0.0 <= val[-1]["val_accuracy"] <= 1.0 and "val_ppl" not in val[-1]


def test_labels_are_saved_with_the_run_and_the_model(trained):
    """labels.json in the run; id2label in final/config.json (full, freeze) or the built-in base's."""
    assert trained.labels == ["angular", "round"]  # sorted: data.labels is not given
    config_dir = trained.run_dir / ("final" if not load_recipe(trained.recipe).method.is_adapter else "base")
    if config_dir.name == "base" and trained.pretrained:
        return  # a user's own base directory is never rewritten
    config = json.loads((config_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "angular", "1": "round"}


def test_trainable_count_is_what_peft_reports(trained, tmp_path):
    """summary.json's count = peft's `get_nb_trainable_parameters()` = the trainable tensors, and the
    new head is among them whatever the method."""
    from ftkit.methods import RunInfo, get_method
    from ftkit.models.load import build_model, count_parameters

    recipe = load_recipe(trained.recipe)
    model, _, _ = build_model(recipe.model, "cpu", recipe.train.seed, base_dir=tmp_path / "base", labels=trained.labels)
    model = get_method(recipe.method.name).apply(model, recipe.method, RunInfo(total_steps=20, train=recipe.train))
    ours = count_parameters(model)[0]
    reported = json.loads((trained.run_dir / "summary.json").read_text())["facts"]["trainable_params"]
    assert ours == reported == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any(p.requires_grad for n, p in model.named_parameters() if "score" in n)
    if recipe.method.is_adapter:
        assert model.get_nb_trainable_parameters()[0] == ours


def test_final_loads_and_matches_training(trained):
    """The reloaded final/ reproduces the val loss and accuracy logged at the last step."""
    model = load_final(trained)
    recipe, tokenizer, val = trained.val_examples()
    pad, cpu = tokenizer.pad_token_id, torch.device("cpu")
    scores = evaluate(model, val, recipe.train.batch_size, pad, cpu, Classification())
    _, logged = read_metrics(trained.run_dir)
    assert scores["loss"] == pytest.approx(logged[-1]["val_loss"], abs=1e-5)
    assert scores["accuracy"] == pytest.approx(logged[-1]["val_accuracy"], abs=1e-9)


def test_merge_equals_adapter(trained):
    """merge_and_unload folds the adapter and the trained head into a plain classifier: same class
    logits within fp32 rounding (1e-4); prompt methods have nothing to fold."""
    recipe = load_recipe(trained.recipe)
    if not recipe.method.is_adapter:
        pytest.skip("full and freeze save a whole model: nothing to merge")
    model = load_final(trained)
    if not recipe.method.mergeable:
        with pytest.raises(AttributeError):
            model.merge_and_unload()
        return
    _, tokenizer, val = trained.val_examples()
    batch = collate_left(val[:8], tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        adapter_logits = class_logits(model, batch)
        merged = model.merge_and_unload()
        merged_logits = class_logits(merged, batch)
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    assert (merged_logits - adapter_logits).abs().max() <= 1e-4


# --- one run, what a user does next -----------------------------------------------------------------


def test_accuracy_rises_above_chance(class_runs):
    """Full fine-tuning learns the task: the last val accuracy beats always guessing the commonest
    class by 0.2 (32 val examples: 0.2 is over twice the standard deviation of chance, ~0.09)."""
    run = class_runs("full")
    _, val = read_metrics(run.run_dir)
    counts = json.loads((run.run_dir / "labels.json").read_text())["val_label_counts"]
    majority = max(counts.values()) / sum(counts.values())
    assert val[-1]["val_accuracy"] >= majority + 0.2, (val[-1], majority)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["classification"]["final_val_accuracy"] == val[-1]["val_accuracy"]
    report = (run.run_dir / "report.md").read_text()
    assert "## Classification" in report and "val accuracy" in report
    assert "generat" not in report.lower()  # nothing about text generation for a classifier


def test_eval_reports_accuracy_and_confusion(class_runs):
    run = class_runs("lora")
    code, out, err = run_cli("eval", str(run.run_dir), "--json")
    assert code == 0, err
    result = json.loads(out)
    _, logged = read_metrics(run.run_dir)
    assert result["tuned"]["loss"] == pytest.approx(logged[-1]["val_loss"], abs=1e-6)
    assert result["tuned"]["accuracy"] == pytest.approx(logged[-1]["val_accuracy"], abs=1e-9)
    matrix = result["confusion"]["matrix"]
    assert result["labels"] == result["confusion"]["labels"] == run.labels
    assert sum(map(sum, matrix)) == result["n_examples"]
    assert sum(matrix[i][i] for i in range(len(matrix))) / result["n_examples"] == pytest.approx(
        result["tuned"]["accuracy"]
    )
    assert sum(figures["examples"] for figures in result["per_label"].values()) == result["n_examples"]
    assert "## Evaluation" in (run.run_dir / "report.md").read_text()


def test_generate_predicts_labels(class_runs):
    run = class_runs("lora")
    code, out, err = run_cli("generate", str(run.run_dir), "--prompt", "A red ring of size 3.")
    assert code == 0, err
    assert out.strip() in run.labels
    assert "classifier" in err
    # stdin: JSONL rows come back with the prediction and each label's probability; plain lines get a label
    import io

    from ftkit.commands.generate import Sampling, run_generate
    from ftkit.models.target import resolve_target

    out = io.StringIO()
    rows = '{"text": "A red ring of size 3.", "id": 7}\n{"text": "A blue cube of size 9."}\n'
    predicted = run_generate(resolve_target(run.run_dir), None, Sampling(), stdin=io.StringIO(rows), stdout=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["predicted"] for line in lines] == predicted and lines[0]["id"] == 7
    assert all(sum(line["probabilities"].values()) == pytest.approx(1.0) for line in lines)


def test_merge_cli_gives_a_standalone_classifier(class_runs, tmp_path):
    """`ftkit merge` verifies and writes a model AutoModelForSequenceClassification loads, with the labels
    in its config and the adapter's class logits."""
    from transformers import AutoModelForSequenceClassification

    run = class_runs("lora")
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", str(run.run_dir), "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["merge"]["passed"] and report["merge"]["max_abs_logit_diff"] <= 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.id2label == {0: "angular", 1: "round"}
    adapter = load_final(run).eval()
    _, tokenizer, val = run.val_examples()
    batch = collate_left(val[:8], tokenizer.pad_token_id)
    with torch.no_grad():
        assert (class_logits(merged, batch) - class_logits(adapter, batch)).abs().max() <= 1e-4


def test_readme_classification_commands_run(tmp_path, monkeypatch):
    """docs/classification.md's block as written (training cut to 3 steps, run dirs in tmp)."""
    import shlex

    from tests.integration.test_readme import DOCS, README, blocks

    page = DOCS / "classification.md"
    block = next(b for b in blocks("", page) if b.startswith("python scripts/make_classification_data.py"))
    words = shlex.split(block, comments=True)
    starts = [i for i, word in enumerate(words) if word == "ftkit"] + [len(words)]
    commands = [words[a + 1 : b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    monkeypatch.chdir(README.parent)

    def moved(arg: str) -> str:
        return str(tmp_path / arg) if arg.startswith(("runs/", "merged/")) else arg

    ran = []
    for command in commands:
        args = [moved(a) for a in command]
        if args[0] == "train":
            args += ["--set", "train.max_steps=3"]
            if "--output-dir" not in args:
                args += ["--output-dir", str(tmp_path / "runs" / "classification")]
        code, out, err = run_cli(*args)
        assert code == 0, (args, err)
        ran.append(args[0])
        if args[0] == "generate":
            assert out.strip() in ("negative", "neutral", "positive")
    assert ran == ["train", "eval", "generate", "train", "merge"]


def test_eval_on_a_data_file_and_format_refused(class_runs, class_data):
    """--data gives the same figures as the run's own val set on the same file; --format is refused."""
    run = class_runs("lora")
    code, out, err = run_cli("eval", str(run.run_dir), "--data", str(class_data / "val.jsonl"), "--json")
    assert code == 0, err
    _, logged = read_metrics(run.run_dir)
    assert json.loads(out)["tuned"]["loss"] == pytest.approx(logged[-1]["val_loss"], abs=1e-6)
    code, out, err = run_cli("eval", str(run.run_dir), "--format", "text")
    assert code == 2 and out == "" and err.startswith("error: --format:") and len(err.splitlines()) == 1
    code, out, err = run_cli("eval", str(run.run_dir), "--baseline")
    assert code == 2 and out == "" and err.startswith("error: --baseline:") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("train_rows", "val_rows", "cited"),
    [
        ([{"text": "a ring", "label": "round"}, {"text": "a cube"}], None, "train.jsonl:2: missing field 'label'"),
        ([{"text": "a ring", "label": "round"}, {"label": "angular"}], None, "train.jsonl:2: missing field 'text'"),
        (
            [{"text": "a ring", "label": "round"}, {"text": "a cube", "label": "angular"}],
            [{"text": "a star", "label": "pointy"}],
            "val.jsonl:1: label 'pointy' never occurs in data.train",
        ),
    ],
)
def test_bad_data_is_one_line_and_leaves_no_run(tmp_path, train_rows, val_rows, cited):
    from tests.support.helpers import write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "data" / "val.jsonl", val_rows or train_rows)
    recipe = make_recipe(tmp_path, tmp_path / "data", task="classification")
    code, out, err = run_cli("train", str(recipe))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and cited in err
    assert not (tmp_path / "runs" / "recipe").exists()


def test_unknown_label_listed_in_the_recipe_names_the_key(tmp_path, class_data):
    recipe = make_recipe(tmp_path, class_data, task="classification", data={"labels": ["round", "angular", "oval"]})
    code, out, err = run_cli("train", str(recipe))
    assert code == 2 and out == ""
    assert err.strip() == (
        "error: data.labels: 'oval' has no row in data.train; "
        "remove it from data.labels or add training rows with that label"
    )


def test_resume_equals_the_uninterrupted_run(tmp_path, class_data):
    """SIGTERM at step 5, then --resume: losses, accuracies, LRs and the final adapter and head are
    bit-identical to the run that never stopped (dropout 0.1 makes the RNG state matter; with grad_accum
    2 and 8 micro-batches per epoch, step 5 stops 2 micro-batches into the second epoch)."""
    from tests.support.resume_helpers import assert_same_run, train

    recipe = {
        "task": "classification",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"max_steps": 8, "grad_accum": 2, "save_every": 2, "eval_every": 3, "warmup_steps": 2},
    }
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
    code, err, reference = train(tmp_path / "a", class_data, "straight", **recipe)
    assert code == 0, err
    code, err, stopped = train(tmp_path / "b", class_data, "stopped", fault="sigterm@step:5", **recipe)
    assert code == 143, err
    code, err, resumed = train(tmp_path / "b", class_data, "stopped", "--resume")
    assert code == 0, err
    assert_same_run(reference, resumed)
    assert json.loads((resumed / "labels.json").read_text())["labels"] == ["angular", "round"]
