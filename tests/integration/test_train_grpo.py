"""GRPO through `ftkit train` / `ftkit eval`, as a user runs it, on the random-init micro-llama: rollouts,
rewards (a user's file and a built-in), the KL to the disabled adapter, metrics and report, the adapter
loading with the real peft, eval agreeing with the run's val_loss, exact resume (sampling RNG included),
and the refusals. Whether GRPO improves a real model is measured in docs/grpo.md (SmolLM2, minutes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.support.helpers import make_recipe, make_rows, run_cli, write_jsonl
from tests.support.resume_helpers import assert_same_tensors, final_tensors, train

#: a dense reward a random byte-level model gets partly right: the share of ASCII letters and digits
REWARDS = """\
def letters(completions, answer, **kwargs):
    assert len(answer) == len(completions)  # the row's columns arrive as lists, one value per completion
    return [sum(c.isascii() and c.isalnum() for c in text) / max(len(text), 1) for text in completions]

CALLS = [0]

def flaky(completions, **kwargs):
    CALLS[0] += 1
    if CALLS[0] >= 3:
        raise ValueError("the scoring service is down")
    return [0.0] * len(completions)
"""

GRPO = {
    "data": {"format": "prompt", "max_length": 64},
    "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "objective": {
        "name": "grpo",
        "group_size": 4,
        "max_new_tokens": 8,
        "beta": 0.04,
        "rewards": [{"function": "my_rewards.py:letters"}, "exact_match"],
    },
    "train": {
        "max_steps": 4,
        "batch_size": 1,
        "grad_accum": 2,
        "lr": 1e-2,
        "eval_every": 2,
        "save_every": 2,
        "keep_last": 5,
        "samples": 1,
        "scheduler": "constant",
        "warmup_steps": 0,
    },
}
WALL_CLOCK = {"tokens_per_s", "mem_bytes", "rollout_s"}


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    rows = [{"prompt": f"{r['instruction']}\n\n{r['input']}", "answer": r["output"]} for r in make_rows(24, seed=1)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "val.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows[:4]])
    return root


def grpo_recipe(tmp: Path, data_dir: Path, name: str, **changes) -> Path:
    (tmp / "my_rewards.py").write_text(REWARDS)
    sections = {key: dict(value) for key, value in GRPO.items()}
    for key, value in changes.items():
        sections[key] = {**sections[key], **value}
    return make_recipe(tmp, data_dir, name=name, **sections)


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines if line]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, prompt_data) -> Path:
    tmp = tmp_path_factory.mktemp("grpo")
    grpo_recipe(tmp, prompt_data, "grpo")
    code, err, run_dir = train(tmp, prompt_data, "grpo")
    assert code == 0, err
    return run_dir


def test_grpo_trains_logs_and_reports(grpo_run, prompt_data):
    lines = [json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for r in steps:
        for key in ("reward", "reward_std", "reward/letters", "reward/exact_match", "kl", "clip_ratio"):
            assert math.isfinite(r[key]), key
        assert r["reward"] == pytest.approx(r["reward/letters"] + r["reward/exact_match"])
        assert 0 < r["reward/letters"] < 1 and r["rollout_s"] > 0 and 0 <= r["zero_adv_groups"] <= 1
        # dapo's unit is one completion token: the step's 2 prompts × 4 completions, each ≤ 8 tokens
        assert r["units"] == pytest.approx(r["completion_length"] * 8) and r["completion_length"] <= 8
        assert r["clip_ratio"] == 0  # iterations 1: every ratio is exactly 1
    assert steps[0]["kl"] == 0 and steps[-1]["kl"] > 0  # the policy leaves the reference (adapter disabled)
    assert any(r["grad_norm"] > 0 for r in steps)
    for r in evals:
        assert r["val_loss"] == pytest.approx(-r["val_reward"]) and "val_exact_match" in r
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["facts"]["task"] == "grpo" and summary["facts"]["reference"] == "disabled adapter"
    assert summary["grpo"]["figures"]["train/reward"]["last"] == pytest.approx(steps[-1]["reward"])
    assert "## Reinforcement learning (grpo)" in (grpo_run / "report.md").read_text()

    # the adapter loads with the real peft and is trained
    base = AutoModelForCausalLM.from_pretrained(grpo_run / "base")
    ids = torch.tensor([[1, 70, 80, 90, 100]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, grpo_run / "final")(input_ids=ids).logits
    assert (tuned - before).abs().max() > 1e-4

    # ftkit eval: the run's own val prompts give its last val_loss; --baseline scores the adapter switched off
    code, out, err = run_cli("eval", str(grpo_run), "--baseline", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tuned"]["loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-6)
    assert {"reward", "reward/letters", "exact_match", "completion_length"} <= result["tuned"].keys()
    assert result["base"]["reward"] == pytest.approx(-result["base"]["loss"])

    # ftkit generate renders a prompt row's way (the chat template), as the run was trained
    code, out, err = run_cli(
        "generate", str(grpo_run), "--prompt", "Extract.\n\nA red cube of size 3.", "--max-new-tokens", "4"
    )
    assert code == 0, err


def test_grpo_resume_is_exact(grpo_run, prompt_data, tmp_path):
    """Stopped after step 2 (SIGTERM, checkpoint) and resumed: the same completions (sampling RNG restored),
    rewards, losses and final adapter as the run that never stopped."""
    grpo_recipe(tmp_path, prompt_data, "resumed")
    code, err, run_dir = train(tmp_path, prompt_data, "resumed", fault="sigterm@step:2")
    assert code == 143, err
    code, err, run_dir = train(tmp_path, prompt_data, "resumed", "--resume")
    assert code == 0, err
    assert records(run_dir) == records(grpo_run)
    assert_same_tensors(final_tensors(run_dir), final_tensors(grpo_run))


def test_reward_error_mid_run_names_the_row_and_keeps_the_checkpoint(tmp_path, prompt_data):
    grpo_recipe(
        tmp_path,
        prompt_data,
        "flaky",
        objective={"rewards": [{"function": "my_rewards.py:flaky"}], "beta": 0.0},
        train={"grad_accum": 1, "save_every": 1, "eval_every": 10},
    )
    code, err, run_dir = train(tmp_path, prompt_data, "flaky")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "reward flaky raised ValueError: the scoring service is down on " in last and "train.jsonl:" in last
    assert (run_dir / "checkpoints" / "step-2" / "complete.json").is_file()  # steps 1-2 scored; step 3 failed
    assert json.loads((run_dir / "summary.json").read_text())["facts"]["status"].startswith("failed at step 2")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"objective": {"rewards": [{"function": "absent.py:score"}]}}, "absent.py: not found"),
        ({"objective": {"group_size": 1}}, "objective.group_size: should be greater than or equal to 2"),
        ({"data": {"val": "NOANSWER"}}, "reward exact_match compares with the row's 'answer', which it lacks"),
    ],
)
def test_bad_input_exits_2_before_the_run_dir(tmp_path, prompt_data, change, message):
    if change.get("data", {}).get("val") == "NOANSWER":
        write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "Extract.\n\nA red cube of size 3."}])
        change = {"data": {"val": str(tmp_path / "noanswer.jsonl")}}
    grpo_recipe(tmp_path, prompt_data, "bad", **change)
    code, err, run_dir = train(tmp_path, prompt_data, "bad")
    assert code == 2, err
    errors = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], err  # one line (the data check comes after the model's)
    assert not run_dir.exists()
