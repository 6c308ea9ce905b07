"""`ftkit eval` on finished runs: it reproduces the training val loss, compares with the base,
keeps stdout pure JSON, never overwrites an earlier eval, and names missing checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.support.helpers import read_metrics, run_cli


def eval_json(*args: str) -> dict:
    code, out, err = run_cli("eval", *args, "--json")
    assert code == 0, err
    return json.loads(out)  # the whole of stdout is one JSON document


@pytest.mark.parametrize("name", ["lora", "qlora", "full"])
def test_val_loss_equals_training_val_loss(trained_runs, name):
    run = trained_runs[name]
    result = eval_json(str(run), "--no-generation")
    _, val = read_metrics(run)
    # same examples, masks and loss code as the training eval: only float summation order may differ
    assert result["tuned"]["loss"] == pytest.approx(val[-1]["val_loss"], abs=1e-5)
    assert result["tuned"]["perplexity"] == pytest.approx(math.exp(result["tuned"]["loss"]))
    assert 0.0 <= result["tuned"]["token_accuracy"] <= 1.0
    assert Path(result["file"]).parent == run


def test_baseline_reports_base_and_delta_and_writes_a_new_file_each_time(trained_runs):
    run = trained_runs["lora"]
    before = set(run.glob("eval-*.json"))
    first = eval_json(str(run), "--baseline", "--max-samples", "6")
    second = eval_json(str(run), "--baseline", "--max-samples", "6")
    assert len(set(run.glob("eval-*.json")) - before) == 2 and first["file"] != second["file"]
    assert first["n_examples"] == 6 and len(first["generations"]) == 6
    for key in ("loss", "token_accuracy", "exact_match", "normalized_match"):
        assert first["delta"][key] == pytest.approx(first["tuned"][key] - first["base"][key])
    # 10 steps at lr 1e-2 move the adapter far from the random base on this task
    assert first["tuned"]["loss"] < first["base"]["loss"] - 0.3
    assert first["generation_backend"] == "transformers"  # no vLLM / GPU here: the fallback runs
    assert "## Evaluation" in (run / "report.md").read_text()


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_baseline_of_an_adapter_is_the_base_model(trained_runs, name):
    """disable_adapter() gives exactly the base (whole trained modules included): its loss equals
    the base loaded on its own, as the run loaded it."""
    from ftkit.data import load_splits
    from ftkit.models.builtin import build_byte_tokenizer
    from ftkit.models.target import load_model, resolve_target
    from ftkit.recipe import load_recipe
    from ftkit.tasks.causal_lm import SFT
    from ftkit.tasks.objective import evaluate

    run = trained_runs[name]
    result = eval_json(str(run), "--baseline", "--no-generation")
    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = build_byte_tokenizer()
    val = load_splits(recipe.data, tokenizer, recipe.train.seed).val
    base = load_model(resolve_target(run), tokenizer, base_only=True)  # NF4 for the QLoRA run
    loss = evaluate(base, val, recipe.train.batch_size, tokenizer.pad_token_id, torch.device("cpu"), SFT())["loss"]
    assert result["base"]["loss"] == pytest.approx(loss, abs=1e-5)


def test_full_fine_tune_baseline_loads_the_runs_base(trained_runs):
    result = eval_json(str(trained_runs["full"]), "--baseline", "--data", str(trained_runs.data_dir / "val.jsonl"),
                       "--max-samples", "4")  # fmt: skip
    assert result["base_model"].endswith("base")
    assert result["tuned"]["loss"] < result["base"]["loss"]
    assert result["data"].endswith("val.jsonl") and result["n_examples"] == 4


def test_human_table_goes_to_stderr_and_stdout_stays_empty(trained_runs):
    code, out, err = run_cli("eval", str(trained_runs["full"]), "--max-samples", "3")
    assert code == 0, err
    assert out == ""
    assert "exact_match" in err and "token_accuracy" in err


def test_checkpoint_is_evaluated_and_a_missing_one_is_named(trained_runs):
    run = trained_runs["lora"]
    result = eval_json(str(run), "--checkpoint", "step-8", "--no-generation")
    _, val = read_metrics(run)
    assert result["checkpoint"] == "step-8"
    assert result["tuned"]["loss"] != pytest.approx(val[-1]["val_loss"], abs=1e-6)  # not final/
    assert "step-8" in Path(result["file"]).name
    code, out, err = run_cli("eval", str(run), "--checkpoint", "step-7")
    assert code == 2 and out == ""
    assert "step-7" in err and "step-4, step-8" in err


def test_bad_inputs_are_one_line_errors(trained_runs, tmp_path):
    for args, expected in (
        ((str(tmp_path / "nowhere"),), "no such run"),
        ((str(trained_runs["lora"]), "--data", str(tmp_path / "missing.jsonl")), "--data"),
        ((str(trained_runs["lora"] / "base"),), "no validation set"),  # a model dir: needs --data
    ):
        code, out, err = run_cli("eval", *args)
        assert code == 2 and out == "", err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_vllm_is_only_used_with_a_gpu():
    from ftkit.tasks.generation import vllm_usable

    assert vllm_usable() is (torch.cuda.is_available() and __import__("importlib").util.find_spec("vllm") is not None)
